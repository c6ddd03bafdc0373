"""Atomic output: an artifact appears whole under its final name, or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import InputError


@contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `out`; when the block succeeds it is renamed to `out`, on any
    error it is removed. `out` must not exist or be empty. Entries get the usual 755/644 modes."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"output folder {out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 / 0600 entries
        for f in tmp.iterdir():
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
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
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
