"""data/atomic.py: a file is replaced whole or not at all, and a write that fails says which file."""

import os

import pytest

from data.atomic import atomic_write, write_text
from data.errors import UserError


def test_a_finished_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    write_text(path, "old\n")
    with atomic_write(path, "wb") as f:
        f.write(b"new\n")
        assert path.read_text() == "old\n"  # nothing visible until the block ends
    assert path.read_text() == "new\n"
    assert os.listdir(tmp_path) == ["out.json"]


def test_a_write_that_fails_midway_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    write_text(path, "old\n")
    with pytest.raises(KeyError):  # the caller's own error comes through unchanged
        with atomic_write(path) as f:
            f.write("half of the new")
            raise KeyError("interrupted")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_a_file_system_error_is_a_user_error_naming_the_file(tmp_path):
    path = tmp_path / "no_such_folder" / "results.md"
    with pytest.raises(UserError, match=f"cannot write {path}: No such file or directory"):
        write_text(path, "table\n")


def test_mode_none_hands_out_the_temporary_path_for_writers_that_want_a_name(tmp_path):
    path = tmp_path / "images.npy"
    with atomic_write(path, mode=None) as tmp:
        assert tmp != str(path) and os.path.dirname(tmp) == str(tmp_path)  # same folder: rename is atomic
        with open(tmp, "wb") as f:
            f.write(b"x")
    assert path.read_bytes() == b"x" and os.listdir(tmp_path) == ["images.npy"]
