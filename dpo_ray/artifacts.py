"""Stage outputs as their own checkpoints: written to a temp folder, manifest written last, then renamed.

A stage folder without a manifest, or whose manifest's key differs from the inputs' key, is never read as
complete. The key is a hash of everything that determines the stage's output (config section, upstream keys,
model fingerprints, input digests), so an identical rerun skips the stage and a changed one recomputes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

MANIFEST = "manifest.json"
_DIGESTED = (".parquet", ".json", ".jsonl")


def input_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_digest(folder: str | Path) -> str:
    """Hash of the data files' bytes under a folder. Other files (model weights, which may be many GB) count by
    name, size and modification time, as models.model_fingerprint counts them: a policy retrained in place has
    the same size but not the same mtime."""
    h = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(root).as_posix()
        if path.suffix in _DIGESTED:
            h.update(f"{rel}:{file_digest(path)}".encode())
        else:
            stat = path.stat()
            h.update(f"{rel}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()


def read_manifest(folder: str | Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def partial_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


def publish(tmp: Path, final: Path, manifest: dict) -> dict:
    """Write the manifest into tmp, then swap tmp into place (the old output, if any, is removed)."""
    manifest = {**manifest, "output_digest": folder_digest(tmp), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json_atomic(tmp / MANIFEST, manifest)
    if final.exists():
        stale = final.with_name(f".{final.name}.stale")
        shutil.rmtree(stale, ignore_errors=True)
        final.rename(stale)
        shutil.rmtree(stale)
    tmp.rename(final)
    return manifest
