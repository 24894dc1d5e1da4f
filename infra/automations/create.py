"""Create (or replace) a Prefect automation of this folder, pointing its notification at a named block.

    python infra/automations/create.py --block slack-webhook/midpo-alerts
    python infra/automations/create.py --block custom-webhook/midpo-alerts --file infra/automations/notify-on-failure.yaml
    python infra/automations/create.py --block slack-webhook/midpo-alerts --print > /tmp/notify.yaml  # only render

Prefect's automation files name a notification block by its id, which differs per server. This script looks
the block up on the current Prefect API (``PREFECT_API_URL``), writes the file with the placeholder
``MIDPO_NOTIFY_BLOCK_ID`` replaced by that id, deletes automations of the same name (so that running it again
does not notify twice) and creates the automation with Prefect's own command,
``prefect automation create --from-file``. docs/lifecycle.md, "Failure notifications".
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

PLACEHOLDER = "MIDPO_NOTIFY_BLOCK_ID"
HERE = Path(__file__).resolve().parent


async def _block_id(slug: str) -> str:
    from prefect.client.orchestration import get_client

    block_type, _, name = slug.partition("/")
    if not name:
        raise SystemExit(f"--block takes <block type slug>/<block name>, e.g. slack-webhook/midpo-alerts; got {slug!r}")
    async with get_client() as client:
        doc = await client.read_block_document_by_name(name, block_type)
    return str(doc.id)


async def _delete_named(name: str) -> int:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        found = await client.read_automations_by_name(name)
        for automation in found:
            await client.delete_automation(automation.id)
    return len(found)


def render(path: Path, block_id: str) -> str:
    text = path.read_text()
    if PLACEHOLDER not in text:
        raise SystemExit(f"{path}: no {PLACEHOLDER} placeholder to replace")
    return text.replace(PLACEHOLDER, block_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block", required=True, help="the notification block: <block type slug>/<block name>")
    parser.add_argument("--file", type=Path, default=HERE / "notify-on-failure.yaml", help="the automation file (default: notify-on-failure.yaml)")
    parser.add_argument("--print", dest="print_only", action="store_true", help="print the rendered file; create nothing")
    args = parser.parse_args(argv)
    text = render(args.file, asyncio.run(_block_id(args.block)))
    if args.print_only:
        print(text, end="")
        return 0
    name = yaml.safe_load(text)["name"]
    replaced = asyncio.run(_delete_named(name))
    if replaced:
        print(f"deleted {replaced} older automation(s) named {name!r}", file=sys.stderr)
    with tempfile.NamedTemporaryFile("w", suffix=args.file.suffix, prefix="midpo-automation-") as f:
        f.write(text)
        f.flush()
        return subprocess.run([sys.executable, "-m", "prefect", "automation", "create", "--from-file", f.name], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
