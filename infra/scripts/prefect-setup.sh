#!/usr/bin/env bash
# One-shot set-up of a Prefect server for midpo (the compose service `setup`; also usable by hand):
#   - the process work pool MIDPO_WORK_POOL (default midpo-gpu), unless it exists; a pool of another type
#     (e.g. the Kubernetes pool) is an error, never overwritten
#   - the global concurrency limit `gpu` with MIDPO_GPU_SLOTS slots (created, or resized when it exists)
#   - the deployments named in MIDPO_DEPLOYMENTS (default: full-pipeline) from prefect.yaml, on that pool
# Run it from the checkout the worker runs flows from (the image's /opt/midpo): `prefect deploy` records the
# current directory as the flow runs' working directory. Idempotent. Needs PREFECT_API_URL.
set -euo pipefail

: "${PREFECT_API_URL:?set PREFECT_API_URL (e.g. http://prefect-server:4200/api)}"
pool="${MIDPO_WORK_POOL:-midpo-gpu}"
slots="${MIDPO_GPU_SLOTS:-1}"
deployments="${MIDPO_DEPLOYMENTS:-full-pipeline}"

cd "$(dirname "$0")/../.."  # the repository root: prefect.yaml and flows/
[ -f prefect.yaml ] || { echo "prefect.yaml not found in $(pwd)" >&2; exit 1; }

# the pool: created when missing, left as it is when it is a process pool, never turned into one
existing="$(python - "$pool" <<'PY'
import sys
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
with get_client(sync_client=True) as client:
    try:
        print(client.read_work_pool(sys.argv[1]).type)
    except ObjectNotFound:
        print("")
PY
)"
if [ -z "$existing" ]; then
    prefect work-pool create "$pool" --type process
elif [ "$existing" != process ]; then
    echo "work pool $pool exists with type $existing: this script sets up a process pool (docs/cluster.md)" >&2
    exit 1
fi
if prefect gcl inspect gpu >/dev/null 2>&1; then
    prefect gcl update gpu --limit "$slots"
else
    prefect gcl create gpu --limit "$slots"
fi
for name in $deployments; do
    # one name at a time: with several deployments at once, `prefect deploy` ignores --pool
    prefect --no-prompt deploy --name "$name" --pool "$pool"
done
echo "midpo: pool $pool, gpu limit $slots, deployments: $deployments"
