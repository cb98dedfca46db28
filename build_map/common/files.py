"""Writes that never leave a half-written file or folder behind, and content hashes of files.

Everything the project writes for later (bundles, exports, caches, buffer metadata) is written
beside its target under a hidden temporary name and renamed into place once complete, so a crash
or a failed validation leaves the previous version, never a torn one.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


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


_OWNER = ".owner"  # inside a temporary folder while it is filled: "pid host" of its writer


@contextmanager
def atomic_folder(target: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Fill a fresh temporary sibling folder of ``target`` (``.NAME.….tmp``); when the block ends
    without an error it becomes ``target``, else it is removed.

    An existing ``target`` is replaced in one atomic exchange where the OS offers it (Linux
    ``renameat2``), else by two renames (``recover_folder`` mends a kill between them); or with
    ``replace=False`` kept as it is and the new folder dropped: another process made the same
    thing first. Temporary folders of killed writers of the same target are removed first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(target)
    remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    (tmp / _OWNER).write_text(f"{os.getpid()} {socket.gethostname()}", encoding="utf-8")
    try:
        yield tmp
        (tmp / _OWNER).unlink(missing_ok=True)
        _publish(tmp, target, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, target: Path, replace: bool) -> None:
    if not target.exists():
        tmp.rename(target)
    elif not replace:
        shutil.rmtree(tmp, ignore_errors=True)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
    else:
        old = _old_name(target)
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        tmp.rename(target)  # a kill before this line leaves only .NAME.old: recover_folder
        shutil.rmtree(old, ignore_errors=True)


def _old_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def recover_folder(target: str | os.PathLike) -> bool:
    """Mend what a kill during a two-rename replace leaves: ``.NAME.old`` and no ``NAME`` →
    the old folder is put back (True); both → the old one is a leftover and is removed."""
    target = Path(target)
    old = _old_name(target)
    if not old.is_dir():
        return False
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        return False
    old.rename(target)
    logger.warning("%s was missing after an interrupted replace; restored it from %s", target, old.name)
    return True


def remove_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders (``.NAME.….tmp``) whose writer on this machine is no longer
    running; folders of running writers, of other machines, or without an owner are kept."""
    target = Path(target)
    removed = []
    for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        owner = tmp / _OWNER
        try:
            pid, host = owner.read_text(encoding="utf-8").split()
        except (OSError, ValueError):
            continue
        if host == socket.gethostname() and not _running(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    if removed:
        logger.info("removed %d temporary folder(s) of killed writers of %s", len(removed), target)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


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
