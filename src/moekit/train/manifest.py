"""Checkpoint folders as files on disk, for every kind moekit writes (single-process model folders, written
by ``train/checkpoint.py``, and sharded DCP folders, written by ``distributed/dcp.py``): one implementation of

- the manifest: ``manifest.json`` lists the size and sha256 of every other file, written last, checked on
  load (a mismatch is a one-line ``CheckpointError`` naming the file);
- atomic publication: a folder is written under a temporary name beside its final one (``.<name>.tmp-*``),
  every file fsynced, then renamed into place (atomic on POSIX); temporaries a crash left are removed by
  ``remove_stale_temps``;
- the run folder's list of checkpoints: ``checkpoints.txt`` (names in the order written, so rotation keeps
  the most recently written ones even when a second run writes smaller step numbers) and ``latest`` (the
  newest), both replaced atomically after the folder is in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from moekit.errors import CheckpointError

MANIFEST, LATEST, HISTORY = "manifest.json", "latest", "checkpoints.txt"
HASH = "sha256"


def fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, HASH).hexdigest()


def _table_digest(files: dict) -> str:
    """Checksum of the manifest's own table, so that damage to the manifest is reported as such."""
    return hashlib.new(HASH, json.dumps(files, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- the manifest
def write_manifest(folder: Path, kind: str) -> None:
    """List every file of ``folder`` (the finished contents of a checkpoint) in its manifest."""
    files = {f.name: {"size": f.stat().st_size, HASH: file_digest(f)} for f in sorted(folder.iterdir())
             if f.is_file() and f.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"format": kind, "version": 1, "files": files,
                                               "files_" + HASH: _table_digest(files)}, indent=1))


def verify_manifest(folder: Path, read: Iterable[str]) -> None:
    """Check every file of ``folder`` against its manifest; CheckpointError naming the first bad file.
    ``read``: the names of the files present that a loader would read (each must be listed)."""
    manifest = _manifest(folder)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"{folder / MANIFEST}: not a moekit manifest (no 'files' table)")
    if manifest.get("files_" + HASH) != _table_digest(files):
        raise CheckpointError(f"{folder / MANIFEST}: damaged (its table does not match its own checksum)")
    for name in read:
        if name not in files:
            raise CheckpointError(f"{folder / name}: not listed in {MANIFEST} (added after the folder was saved)")
    for name, entry in files.items():
        f = folder / name
        if Path(name).name != name or not isinstance(entry, dict):
            raise CheckpointError(f"{folder / MANIFEST}: bad entry {name!r}")
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in {MANIFEST})")
        if f.stat().st_size != entry.get("size"):
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, the manifest says {entry.get('size')} "
                                  f"(truncated or damaged)")
        if file_digest(f) != entry.get(HASH):
            raise CheckpointError(f"{f}: {HASH} checksum mismatch (the file changed after it was saved: damaged "
                                  f"or edited)")


def _manifest(folder: Path):
    return read_json(folder / MANIFEST, missing="missing, so the folder's files cannot be checked (written by an "
                                                "older moekit or by hand); use --no-verify to load it unchecked")


def read_json(file: Path, missing: str = "missing"):
    """The JSON in ``file``; CheckpointError naming it if it is absent or not JSON."""
    if not file.is_file():
        raise CheckpointError(f"{file}: {missing}")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------- atomic folders
def remove_stale_temps(parent: str | Path, name: str = "*") -> None:
    """Delete the temporary files and folders a killed save of ``parent/<name>`` left behind (default: all
    of them, for a run folder, where every ``.*.tmp-*`` entry is moekit's)."""
    for p in Path(parent).glob(f".{name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def replace_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    fsync(tmp)
    os.replace(tmp, path)


def move_into_place(tmp: Path, path: Path) -> None:
    """fsync the finished folder ``tmp`` and rename it to ``path`` (replacing a folder of that name)."""
    for f in tmp.iterdir():
        fsync(f)
    fsync(tmp)
    if path.exists():  # replacing a folder of the same name: move the old one aside first
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-old-", dir=path.parent))
        os.rename(path, old / path.name)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
    fsync(path.parent)


# ----------------------------------------------------------------------------- the run folder's checkpoints
def history(run_dir: Path) -> list[str]:
    """Checkpoint folder names in the order they were written (oldest first); folders written before
    ``checkpoints.txt`` existed come first, by modification time."""
    listed = (run_dir / HISTORY).read_text(errors="replace").split() if (run_dir / HISTORY).is_file() else []
    listed = [n for n in listed if n.startswith("ckpt-") and Path(n).name == n]  # never a path outside run_dir
    unlisted = sorted((p for p in run_dir.glob("ckpt-*") if p.is_dir() and p.name not in listed),
                      key=lambda p: p.stat().st_mtime_ns)
    return [p.name for p in unlisted] + [n for n in listed if (run_dir / n).is_dir()]


def record_checkpoint(final: Path, keep_last: int) -> None:
    """``final`` (in place) becomes the newest checkpoint of its run folder: ``latest`` names it, and only the
    ``keep_last`` most recently written checkpoints are kept (0 = all)."""
    run_dir = final.parent
    order = [n for n in history(run_dir) if n != final.name] + [final.name]
    keep = order[-keep_last:] if keep_last > 0 else order
    replace_atomically(run_dir / HISTORY, "".join(f"{n}\n" for n in keep))
    replace_atomically(run_dir / LATEST, final.name)
    fsync(run_dir)
    for name in order[:-len(keep)]:  # never the newest: it is the last of ``order``
        shutil.rmtree(run_dir / name, ignore_errors=True)
