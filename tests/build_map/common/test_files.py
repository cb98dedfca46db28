"""Atomic writes: a finished folder or file replaces the old one whole; a failure leaves the old one
and no temporary sibling behind."""

from __future__ import annotations

import os

import pytest

from build_map.common.files import atomic_folder, file_sha256, write_text_atomic


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_atomic_folder_replaces_the_old_folder_only_when_complete(tmp_path):
    target = tmp_path / "bundle"
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("first")
        assert not target.exists()  # nothing is published before the block ends
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("half-written")
        raise RuntimeError("the build failed")
    assert (target / "a.txt").read_text() == "first"
    assert _siblings(target) == []
    with atomic_folder(target) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"] and _siblings(target) == []


def test_atomic_folder_can_keep_what_another_process_made_first(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    (target / "theirs").write_text("kept")
    with atomic_folder(target, replace=False) as tmp:
        (tmp / "mine").write_text("dropped")
    assert sorted(p.name for p in target.iterdir()) == ["theirs"] and _siblings(target) == []


def test_replacing_swaps_in_one_step_or_mends_a_kill_between_renames(tmp_path, monkeypatch):
    from build_map.common import files

    target = tmp_path / "bundle"
    for attempt, exchange in enumerate((files._exchange, lambda a, b: False)):  # renameat2, then two renames
        monkeypatch.setattr(files, "_exchange", exchange)
        with atomic_folder(target) as tmp:
            (tmp / "a.txt").write_text(f"version {attempt}")
        assert (target / "a.txt").read_text() == f"version {attempt}"
        assert sorted(p.name for p in target.iterdir()) == ["a.txt"] and _siblings(target) == []
    if os.uname().sysname == "Linux":
        monkeypatch.undo()
        assert files._exchange(tmp_path / "bundle", tmp_path / "bundle")  # renameat2 is there

    # a kill after the first rename of a two-rename replace: only .bundle.old is left
    target.rename(tmp_path / ".bundle.old")
    assert files.recover_folder(target) and (target / "a.txt").read_text() == "version 1"
    (tmp_path / ".bundle.old").mkdir()  # a kill after the second rename: the old one is a leftover
    assert not files.recover_folder(target) and _siblings(target) == []


def test_temporary_folders_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    target = tmp_path / "bundle"
    killed = tmp_path / ".bundle.abc123.tmp"
    running = tmp_path / ".bundle.def456.tmp"
    unowned = tmp_path / ".bundle.ghi789.tmp"
    for folder, owner in ((killed, dead.stdout.strip()), (running, str(os.getpid())), (unowned, None)):
        folder.mkdir()
        (folder / "features.parquet").write_text("half")
        if owner:
            (folder / ".owner").write_text(f"{owner} {socket.gethostname()}")
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("new")
    assert not killed.exists() and running.exists() and unowned.exists()
    assert not (target / ".owner").exists()


def test_write_text_atomic_leaves_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "page.html"
    write_text_atomic(path, "old")

    def broken_replace(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old" and _siblings(path) == []


def test_folder_hash_covers_names_and_contents(tmp_path):
    folder = tmp_path / "sae"
    folder.mkdir()
    (folder / "cfg.json").write_text("{}")
    before = file_sha256(folder)
    (folder / "cfg.json").rename(folder / "other.json")
    assert file_sha256(folder) != before
    (folder / "other.json").write_text("{ }")
    assert file_sha256(folder / "other.json") != file_sha256(folder)
