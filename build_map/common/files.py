"""Writes that never leave a half-written file or folder behind, and content hashes of files.

Everything the project writes for later (bundles, exports, caches, buffer metadata) is written
beside its target under a hidden temporary name and renamed into place once complete, so a crash
or a failed validation leaves the previous version, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` through a temporary sibling file and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding=encoding) as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data: Any, **dumps_options: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, **dumps_options))


@contextmanager
def atomic_folder(target: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Fill a fresh temporary sibling folder of ``target`` (``.NAME.….tmp``); when the block ends
    without an error it becomes ``target``, else it is removed.

    An existing ``target`` is replaced (renamed aside, then removed), or with ``replace=False``
    kept as it is and the new folder dropped: another process made the same thing first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _publish(tmp, target, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, target: Path, replace: bool) -> None:
    if not target.exists():
        tmp.rename(target)
    elif not replace:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's files (sorted by name, names included) for folder formats."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):  # noqa: B023
                digest.update(block)
    return digest.hexdigest()
