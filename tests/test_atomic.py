"""blindseg_dist.atomic: a destination holds the old content or the whole new one, never a part, and
nothing temporary is left behind."""
import json
import os

import pytest

from blindseg_dist import atomic


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def test_write_text_json_bytes_replace_and_create_folders(tmp_path):
    p = tmp_path / "a" / "b" / "x.json"
    atomic.write_json(p, {"k": 1}, indent=1)
    assert json.loads(p.read_text()) == {"k": 1}
    atomic.write_text(p, "new")
    assert p.read_text() == "new"
    atomic.write_bytes(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert _leftovers(p.parent) == []


def test_a_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "summary.json"
    p.write_text("old")
    with pytest.raises(ZeroDivisionError):
        with atomic.replacing(p) as tmp:
            tmp.write_text("half")
            1 / 0
    assert p.read_text() == "old" and _leftovers(tmp_path) == []
    with pytest.raises(TypeError):  # not JSON-serializable: the old file stays
        atomic.write_json(p, {"x": object()})
    assert p.read_text() == "old" and _leftovers(tmp_path) == []


def test_the_temporary_file_is_a_sibling_named_by_pid(tmp_path):
    p = tmp_path / "m.tar"
    with atomic.replacing(p) as tmp:
        assert tmp.parent == tmp_path and tmp.name == f"m.tar.tmp-{os.getpid()}" and not p.exists()
        tmp.write_bytes(b"tar")
    assert p.read_bytes() == b"tar"


def test_removing_the_temporary_file_leaves_the_destination_alone(tmp_path):
    p = tmp_path / "shard.tar"
    with atomic.replacing(p) as tmp:
        tmp.write_bytes(b"empty")
        tmp.unlink()  # nothing worth keeping
    assert not p.exists()


def test_replace_dir(tmp_path):
    final, tmp = tmp_path / "7", tmp_path / ".tmp-7"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "model.safetensors").write_text("new")
    assert atomic.replace_dir(tmp, final) == final
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors"] and not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["7"]  # the old folder set aside is removed


def test_replace_dir_puts_the_old_folder_back_when_the_move_fails(tmp_path, monkeypatch):
    final, tmp = tmp_path / "7", tmp_path / ".tmp-7"
    final.mkdir()
    (final / "model.safetensors").write_text("old")
    tmp.mkdir()
    (tmp / "model.safetensors").write_text("new")
    real = os.replace

    def failing(src, dst):
        if os.fspath(src) == os.fspath(tmp):
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing)
    with pytest.raises(OSError):
        atomic.replace_dir(tmp, final)
    assert (final / "model.safetensors").read_text() == "old"  # never deleted for a failed replace
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-7", "7"]
