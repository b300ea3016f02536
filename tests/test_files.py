"""Output files get the permissions of any new file of the user's, not mkstemp's owner-only 0600."""

from __future__ import annotations

import os
import stat

import pytest

from defectscope.common.files import new_file_mode, replacing


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def test_new_file_mode_follows_the_umask(umask_027):
    assert new_file_mode() == umask_027
    os.umask(0o002)
    assert new_file_mode() == 0o664


def test_replacing_creates_the_target_only_when_complete(tmp_path, umask_027):
    target = tmp_path / "sub" / "model.dsmodel"
    with replacing(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".model.dsmodel.")
        tmp.write_bytes(b"new")
        assert not target.exists()
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == umask_027
    assert [p.name for p in target.parent.iterdir()] == ["model.dsmodel"]


def test_replacing_keeps_the_old_file_and_its_mode(tmp_path, umask_027):
    target = tmp_path / "model.dsmodel"
    target.write_bytes(b"old")
    target.chmod(0o600)
    with pytest.raises(RuntimeError, match="crash"), replacing(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.dsmodel"]
    with replacing(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o600


def test_model_and_benchmark_files_are_readable_like_other_files(tmp_path, umask_027):
    import torch

    from defectscope.benchmark import _atomic_write_text
    from defectscope.io import write_model_file

    model = tmp_path / "m.dsmodel"
    write_model_file(model, {"x": torch.zeros(2)}, {"format": "defectscope-model", "format_version": 1})
    text = tmp_path / "benchmark.md"
    _atomic_write_text(text, "table")
    assert stat.S_IMODE(model.stat().st_mode) == umask_027
    assert stat.S_IMODE(text.stat().st_mode) == umask_027
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benchmark.md", "m.dsmodel"]  # no temporary left
