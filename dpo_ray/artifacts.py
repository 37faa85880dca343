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

import pyarrow as pa
import pyarrow.parquet as pq

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


def _file_records(root: Path, hash_data: bool = True) -> list[tuple[str, str, str]]:
    """(path relative to root, what the digest hashes, size:mtime stamp) of every file under root but the manifest.
    Data files count by their bytes; others (model weights, which may be many GB) by name, size and modification
    time, as models.model_fingerprint counts them: a policy retrained in place has the same size but not the same
    mtime. Without `hash_data` only the stamps are worth anything."""
    records = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        stat = path.stat()
        stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        digest = file_digest(path) if hash_data and path.suffix in _DIGESTED else stamp
        records.append((path.relative_to(root).as_posix(), digest, stamp))
    return records


def _hash(lines) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode())
    return h.hexdigest()


def folder_digest(folder: str | Path) -> str:
    """Hash of the data files' bytes under a folder, and of the other files' names, sizes and mtimes."""
    return _hash(f"{rel}:{token}" for rel, token, _ in _file_records(Path(folder)))


def _stamp(records) -> str:
    return _hash(f"{rel}:{stamp}" for rel, _, stamp in records)


def _entry_digests(root: Path) -> dict[str, dict]:
    """For the folder ('.') and each entry in it: the digest `keys.digest` would compute for it, and the stamp
    (names, sizes, mtimes) under which that digest stays valid."""
    records = _file_records(root)
    by_path = {rel: (token, stamp) for rel, token, stamp in records}
    entries = {".": {"digest": _hash(f"{rel}:{token}" for rel, token, _ in records), "stamp": _stamp(records)}}
    for child in sorted(p for p in root.iterdir() if p.name != MANIFEST):
        if child.is_file():
            token, stamp = by_path[child.name]
            mine = [("", token, stamp)]
            digest = token if child.suffix in _DIGESTED else file_digest(child)
        else:
            prefix = f"{child.name}/"
            mine = [(rel.removeprefix(prefix), token, stamp) for rel, token, stamp in records if rel.startswith(prefix)]
            digest = _hash(f"{rel}:{token}" for rel, token, _ in mine)
        entries[child.name] = {"digest": digest, "stamp": _stamp(mine)}
    return entries


def recorded_digest(path: Path) -> str | None:
    """The digest a published stage's manifest records for `path` (the stage folder or an entry in it), if the
    files there still have the names, sizes and mtimes they had when it was published; else None."""
    for folder, name in ((path, "."), (path.parent, path.name)):
        entry = ((read_manifest(folder) or {}).get("digests") or {}).get(name)
        if entry:
            records = _file_records(path, hash_data=False) if path.is_dir() else _single_file_record(path)
            return entry["digest"] if entry["stamp"] == _stamp(records) else None
    return None


def _single_file_record(path: Path) -> list[tuple[str, str, str]]:
    stat = path.stat()
    return [("", "", f"{stat.st_size}:{stat.st_mtime_ns}")]


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


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write `table` to a temporary file beside `path` (named by this process) and rename it: a reader sees the
    whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def partial_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


def publish(tmp: Path, final: Path, manifest: dict) -> dict:
    """Write the manifest into tmp, then swap tmp into place (the old output, if any, is removed)."""
    digests = _entry_digests(tmp)
    manifest = {**manifest, "output_digest": digests["."]["digest"], "digests": digests,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json_atomic(tmp / MANIFEST, manifest)
    if final.exists():
        stale = final.with_name(f".{final.name}.stale")
        shutil.rmtree(stale, ignore_errors=True)
        final.rename(stale)
        shutil.rmtree(stale)
    tmp.rename(final)
    return manifest
