"""Atomic output: an artifact appears whole under its final name, or not at all; and the file list
(size + sha256 of every file) its manifest carries, against which it is checked before use.

Temporary folders and files are named `.<out name>.tmp-<pid>-<random>` beside the output, so a run
killed outright (SIGKILL, power loss) leaves a folder that the next run writing the same output
recognises as its own (same output name, owner process gone) and removes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import CheckpointError, InputError

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def existing_base(out: Path) -> Path:
    """The nearest folder above `out` that exists (the ones between are made on the way)."""
    base = out.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    return base


def probe_writable(folder: Path, name: str) -> None:
    """Make and remove a trial folder `.<name>.probe-*` in `folder`: permissions, read-only mounts
    and pseudo file systems (/proc) all answer here with an OSError, before any work."""
    Path(tempfile.mkdtemp(prefix=f".{name}.probe-", dir=folder)).rmdir()


def check_output_folder(out: str | Path) -> Path:
    """`out` as a Path, or InputError when it exists and is not an empty folder, or when no folder
    can be made where it goes (every writer's rule, checked before the work that fills it)."""
    if not isinstance(out, (str, os.PathLike)):
        raise InputError(f"an output folder is a path, got {out!r:.60}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output folder {out} is an existing file")
    if out.exists() and any(out.iterdir()):
        raise InputError(f"output folder {out} exists and is not empty")
    base = existing_base(out)
    try:
        probe_writable(base, out.name)
    except OSError as e:
        raise InputError(f"cannot write the output folder {out}: {base}: {e.strerror or e}") from None
    return out


def check_output_file(out: str | Path) -> Path:
    """`out` as a Path, or InputError when no file can be written there: a folder is in the way, a
    file stands where one of its folders goes, or the place is not writable (before the work)."""
    out = Path(out)
    if out.is_dir():
        raise InputError(f"output path {out} is a folder, expected a file name")
    base = existing_base(out)
    if not base.is_dir():
        raise InputError(f"cannot write {out}: {base} is a file, not a folder")
    try:
        probe_writable(base, out.name)
    except OSError as e:
        raise InputError(f"cannot write {out}: {base}: {e.strerror or e}") from None
    return out


@contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `out`; when the block succeeds it is renamed to `out`, on any
    error it is removed. `out` must not exist or be empty. Entries get the usual 755/644 modes."""
    out = check_output_folder(out)
    tmp = temp_folder(out)
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 / 0600 entries
        for f in tmp.iterdir():
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        try:
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        except OSError as e:  # another run wrote `out` meanwhile: its result stays, this one goes
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise InputError(f"output folder {out} was filled by another run while this one worked; "
                             f"this run's result was discarded") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(out: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `out` to write; renamed to `out` on success, removed on error."""
    out = Path(out)
    if out.is_dir():
        raise InputError(f"output path {out} is a folder, expected a file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temp_folder(out: str | Path, tag: str = "") -> Path:
    """A new empty folder `.<out name>.tmp-<pid>-[tag-]<random>` beside `out` (after removing the
    stale ones of earlier, dead runs for `out`); the caller removes it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-{tag + '-' if tag else ''}", dir=out.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(out: str | Path) -> list[Path]:
    """Remove the temporary folders / files beside `out` that a killed run writing `out` left behind
    (named `.<out name>.tmp-<pid>-...`, nested ones included, whose process is gone); returns them."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern = re.compile(r"^\.+" + re.escape(out.name) + r"\.tmp-(\d+)-")
    removed = []
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (artifacts are GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entries(folder: str | Path) -> dict[str, dict]:
    """name -> {"bytes", "sha256"} of every file in `folder` except manifest.json, sorted by name."""
    folder = Path(folder)
    return {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
            for f in sorted(folder.iterdir(), key=lambda f: f.name) if f.is_file() and f.name != MANIFEST}


_SELF = "manifest_sha256"
_SELF_RE = re.compile(rb'"manifest_sha256": "([0-9a-f]{64})"')


def write_manifest(folder: str | Path, manifest: dict) -> dict:
    """Write `folder`/manifest.json with `files` (size and sha256 of every other file of the folder);
    call it last, once every other file is written. The manifest carries its own sha256 too
    (`manifest_sha256`: of its bytes with that value zeroed), so a flipped byte in it is found.
    Returns the manifest written."""
    folder = Path(folder)
    manifest = {k: v for k, v in manifest.items() if k != _SELF}
    manifest = {**manifest, "files": file_entries(folder), _SELF: "0" * 64}
    raw = (json.dumps(manifest, indent=2) + "\n").encode()
    manifest[_SELF] = hashlib.sha256(raw).hexdigest()
    (folder / MANIFEST).write_bytes(_SELF_RE.sub(f'"{_SELF}": "{manifest[_SELF]}"'.encode(), raw, count=1))
    return manifest


def check_manifest_digest(folder: str | Path) -> None:
    """Raise CheckpointError when manifest.json's bytes do not match its own `manifest_sha256`."""
    f = Path(folder) / MANIFEST
    raw = f.read_bytes()
    m = list(_SELF_RE.finditer(raw))
    if len(m) != 1:
        raise CheckpointError(f"{f}: no manifest_sha256 (the manifest is corrupt or was edited)")
    zeroed = raw[:m[0].start(1)] + b"0" * 64 + raw[m[0].end(1):]
    if hashlib.sha256(zeroed).hexdigest() != m[0].group(1).decode():
        raise CheckpointError(f"{f}: sha256 differs from its manifest_sha256 (the manifest is corrupt or was "
                              f"edited); re-export the artifact")


def check_files(folder: str | Path, manifest: dict | None = None, hashes: bool = False) -> int:
    """Check an artifact folder against its manifest's file list: every file present with its size
    (cheap; before every load) and, with `hashes`, its sha256. Raises CheckpointError naming the
    first file that differs; returns the number of files checked (0 for a manifest without a list,
    written before lists existed)."""
    folder = Path(folder)
    if manifest is None:
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{folder / MANIFEST}: unreadable ({type(e).__name__}: {e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if files is None:
        return 0
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise CheckpointError(f"{folder / MANIFEST}: malformed file list")
    for name, entry in files.items():
        f = folder / str(name)
        if Path(str(name)).name != name or not f.is_file():
            raise CheckpointError(f"{f}: missing (the manifest lists it); the artifact is incomplete")
        size = f.stat().st_size
        if size != entry.get("bytes"):
            raise CheckpointError(f"{f}: {size} bytes, the manifest says {entry.get('bytes')} (truncated or "
                                  f"replaced); re-export the artifact")
        if hashes and sha256_file(f) != entry.get("sha256"):
            raise CheckpointError(f"{f}: sha256 differs from the manifest's (the file is corrupt); re-export "
                                  f"the artifact")
    return len(files)
