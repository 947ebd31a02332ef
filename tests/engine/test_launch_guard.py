"""The trainer refuses a launch whose processes do not form one group (independent copies)."""
import pytest

from blindseg_dist.engine.accelerator import LaunchError, check_world


def test_world_size_mismatch_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError) as e:
        check_world(1)  # the launcher started 2 processes, this one sees a group of 1
    msg = str(e.value)
    assert "WORLD_SIZE=2" in msg and "ACCELERATE_USE_CPU=1" in msg and "--multi_gpu" in msg


def test_single_process_without_launcher_is_fine(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    check_world(1)


def test_launcher_world_of_one_is_fine(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_world(1)
