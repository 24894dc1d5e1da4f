"""Training checkpoints mirrored under the artifact root, so a retry on another machine resumes.

transformers writes ``checkpoint-N/`` into a local ``checkpoint_dir``; a retry on another machine (a
spot instance, another pod) starts with an empty one and would redo every step. :class:`MirrorCheckpoints`
publishes each checkpoint right after it is written to ``<prefix>/checkpoint-N`` in an
:class:`~midpo.storage.ArtifactStore` (atomic: the store's manifest goes last), with the run claim
(``midpo_run.json``) at ``<prefix>/run``, and keeps the newest ``keep`` mirrored checkpoints.
:func:`restore_checkpoint` brings the newest *complete* mirrored checkpoint back into an empty or older
local ``checkpoint_dir`` before training starts. Where a checkpoint comes from never changes a result:
a resume restores optimizer, scheduler and RNG state either way.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from midpo.storage import MANIFEST, ArtifactStore, sha256_file
from midpo.train.trainer import RUN_FILE, last_checkpoint

log = logging.getLogger(__name__)

CLAIM_KEY = "run"  # <prefix>/run/midpo_run.json
PREFIX = "checkpoint-"


def _step(name: str) -> int | None:
    suffix = name[len(PREFIX) :] if name.startswith(PREFIX) else ""
    return int(suffix) if suffix.isdigit() else None


def mirrored_checkpoints(store: ArtifactStore, prefix: str, *, complete_only: bool = True) -> list[tuple[int, str]]:
    """``(step, key)`` of the checkpoints under ``prefix``, oldest first; only complete ones unless asked."""
    found = [(s, f"{prefix}/{name}") for name in store.children(prefix) if (s := _step(name)) is not None]
    return sorted((s, k) for s, k in found if not complete_only or store.is_complete(k))


def _fetch_into(store: ArtifactStore, key: str, dest: Path) -> None:
    """Complete version ``key`` as folder ``dest`` (assembled beside it, then renamed into place)."""
    staging = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.partial")
    try:
        got = store.fetch(key, staging)
        if got != staging:  # file:// stores hand back their own folder: copy it
            shutil.copytree(got, staging)
        (staging / MANIFEST).unlink(missing_ok=True)
        if dest.exists():  # a local folder of a crashed save (no trainer_state.json): replaced
            shutil.rmtree(dest)
        os.rename(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _restore_claim(store: ArtifactStore, prefix: str, checkpoint_dir: Path) -> None:
    """Copy the mirrored run claim into ``checkpoint_dir``; a different local claim is an error."""
    key = f"{prefix}/{CLAIM_KEY}"
    if not store.is_complete(key):
        return
    with tempfile.TemporaryDirectory() as tmp:
        mirrored = (store.fetch(key, Path(tmp) / "run") / RUN_FILE).read_bytes()
    local = checkpoint_dir / RUN_FILE
    if local.is_file():
        if json.loads(local.read_bytes()) != json.loads(mirrored):
            raise ValueError(f"{store.uri(prefix)} mirrors checkpoints of another run than {local}: use another prefix or checkpoint_dir")
        return
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    local.write_bytes(mirrored)


def restore_checkpoint(store: ArtifactStore, prefix: str, checkpoint_dir: str | Path) -> str | None:
    """The checkpoint to resume from: the local one, or the newest complete mirrored one fetched into
    ``checkpoint_dir/checkpoint-N`` when it is newer than any complete local one; None when neither exists.

    The mirrored run claim (``midpo_run.json``) comes along when ``checkpoint_dir`` has none, so the
    trainer's claim check then compares this run with the one that wrote the mirror.
    """
    checkpoint_dir = Path(checkpoint_dir)
    _restore_claim(store, prefix, checkpoint_dir)
    local = last_checkpoint(checkpoint_dir)
    local_step = _step(Path(local).name) if local else -1
    mirrored = mirrored_checkpoints(store, prefix)
    if not mirrored or mirrored[-1][0] <= local_step:
        log.info(
            "checkpoints: %s (mirror %s: newest complete step %s)",
            f"resuming from local {local}" if local else "none local, starting fresh",
            store.uri(prefix),
            mirrored[-1][0] if mirrored else "none",
        )
        return local
    step, key = mirrored[-1]
    dest = checkpoint_dir / f"{PREFIX}{step}"
    _fetch_into(store, key, dest)
    log.info("checkpoints: restored step %d from %s into %s (local newest: %s)", step, store.uri(key), dest, local or "none")
    return str(dest)


class MirrorCheckpoints(TrainerCallback):
    """Publish every checkpoint the trainer saves to ``<prefix>/checkpoint-N`` and keep the newest ``keep``.

    Runs in ``on_save``, after transformers has written ``args.output_dir/checkpoint-<global_step>``
    completely; only the main process uploads. The upload blocks training while it runs (a checkpoint of
    a LoRA run is the adapter plus its optimizer state: small). The run claim goes to ``<prefix>/run`` with
    the first checkpoint. Pruning deletes older mirrored checkpoints manifest first, so a crash while
    pruning never leaves a version that looks complete.
    """

    def __init__(self, store: ArtifactStore, prefix: str, *, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.store, self.prefix, self.keep = store, prefix.strip("/"), keep
        self._claim_published = False

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX}{state.global_step}"
        if not (folder / "trainer_state.json").is_file():
            log.warning("checkpoints: %s is missing or incomplete; not mirrored", folder)
            return
        self._publish_claim(Path(args.output_dir))
        key = f"{self.prefix}/{folder.name}"
        if self.store.is_complete(key):
            log.info("checkpoints: %s already mirrored", self.store.uri(key))
        else:
            self.store.publish(folder, key, metadata={"global_step": state.global_step})
            log.info("checkpoints: mirrored %s -> %s", folder, self.store.uri(key))
        self.prune()

    def _publish_claim(self, checkpoint_dir: Path) -> None:
        if self._claim_published:
            return
        claim = checkpoint_dir / RUN_FILE
        if claim.is_file():
            key = f"{self.prefix}/{CLAIM_KEY}"
            if self.store.is_complete(key):
                if self.store.manifest(key)["files"].get(RUN_FILE, {}).get("sha256") != sha256_file(claim):
                    raise ValueError(f"{self.store.uri(self.prefix)} mirrors checkpoints of another run than {claim}")
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    shutil.copy2(claim, Path(tmp) / RUN_FILE)
                    self.store.publish(Path(tmp), key)
        self._claim_published = True

    def prune(self) -> list[str]:
        """Delete mirrored checkpoints older than the newest ``keep`` complete ones (incomplete leftovers
        of interrupted uploads below that step included); returns the deleted keys."""
        complete = mirrored_checkpoints(self.store, self.prefix)
        if len(complete) <= self.keep:
            return []
        oldest_kept = complete[-self.keep][0]
        deleted = [k for s, k in mirrored_checkpoints(self.store, self.prefix, complete_only=False) if s < oldest_kept]
        for key in deleted:
            self.store.delete(key)
        if deleted:
            log.info("checkpoints: pruned %s", ", ".join(deleted))
        return deleted


__all__ = ["MirrorCheckpoints", "mirrored_checkpoints", "restore_checkpoint"]
