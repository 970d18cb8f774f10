"""pyro_mcp.fsio: the one atomic write, JSON record reader and file sha256 of the package."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pyro_mcp.errors import StateError
from pyro_mcp.fsio import (
    fsync_path,
    read_json_object,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
)


def test_json_round_trip_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2]})
    first_inode = path.stat().st_ino
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    write_json_atomic(path, {"a": "new"})
    assert read_json_object(path) == {"a": "new"}
    assert path.stat().st_ino != first_inode  # a new file renamed over the old one
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temp file left


def test_mode_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        write_bytes_atomic(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o640
    write_bytes_atomic(tmp_path / "tool", b"#!/bin/sh\n", mode=0o755)
    assert (tmp_path / "tool").stat().st_mode & 0o777 == 0o755


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    write_json_atomic(path, {"v": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"v": object()})
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "record.json").mkdir()  # rename over a folder fails
    with pytest.raises(OSError):
        write_bytes_atomic(tmp_path / "sub" / "record.json", b"{}")
    assert read_json_object(path) == {"v": 1}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["record.json", "record.json", "sub"]


def test_read_json_object_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_json_object(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(StateError) as info:
        read_json_object(tmp_path / "bad.json", hint="remove it")
    assert info.value.hint == "remove it" and "bad.json" in info.value.message
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(StateError, match="does not hold a JSON object"):
        read_json_object(tmp_path / "list.json")


def test_sha256_file_and_fsync(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
    fsync_path(tmp_path / "blob")
    fsync_path(tmp_path)  # a folder too
