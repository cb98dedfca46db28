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
