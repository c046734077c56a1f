"""Atomic output files (dwconvert/files.py): complete or absent, and never replaced unasked."""

from __future__ import annotations

import os
import pickle

import pytest

from dwconvert import files
from dwconvert.files import write_atomically, write_text


def test_a_write_replaces_by_default_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    write_text(path, "new")
    assert path.read_text() == "new"
    assert sorted(tmp_path.iterdir()) == [path]


def test_a_failed_write_keeps_the_old_content(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def fails(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(path, fails)
    assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]


def test_without_replace_an_existing_file_is_kept_and_nothing_is_written(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("mine")
    calls = []
    with pytest.raises(FileExistsError, match="exists; it is kept"):
        write_atomically(path, calls.append, replace=False)
    assert calls == [] and path.read_text() == "mine"


@pytest.mark.parametrize("hard_links", [True, False])
def test_without_replace_a_file_that_appears_while_writing_is_kept(tmp_path, monkeypatch,
                                                                   hard_links):
    if not hard_links:  # a file system that refuses them: checked, then renamed
        def no_link(src, dst):
            raise PermissionError("hard links not supported")
        monkeypatch.setattr(files.os, "link", no_link)
    path = tmp_path / "out.txt"

    def raced(tmp):
        tmp.write_text("ours")
        path.write_text("theirs")

    with pytest.raises(FileExistsError, match="appeared while it was being written"):
        write_atomically(path, raced, replace=False)
    assert path.read_text() == "theirs" and sorted(tmp_path.iterdir()) == [path]

    fresh = tmp_path / "fresh.txt"
    write_text(fresh, "ours", replace=False)
    assert fresh.read_text() == "ours"
    assert sorted(tmp_path.iterdir()) == [fresh, path]


def test_a_new_file_gets_the_mode_of_any_new_file(tmp_path):
    mask = os.umask(0o027)
    try:
        path = write_text(tmp_path / "out.txt", "x", replace=False)
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o640


def test_the_refusal_names_the_option_of_the_library_or_of_the_command_line(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("mine")
    with pytest.raises(files.OutputExists) as caught:
        write_text(path, "new", replace=False)
    err = caught.value
    assert isinstance(err, FileExistsError) and err.path == path
    assert "overwrite=True" in str(err) and "--force" not in str(err)
    assert "--force" in err.for_cli() and "overwrite=True" not in err.for_cli()
    resumable = files.OutputExists(path, resume=True)
    assert "resume=True" in str(resumable) and "--resume" in resumable.for_cli()
    copied = pickle.loads(pickle.dumps(resumable))
    assert str(copied) == str(resumable) and copied.for_cli() == resumable.for_cli()
    assert copied.path == path and copied.resume
