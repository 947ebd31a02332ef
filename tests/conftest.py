"""Fixtures shared by the whole suite. The tests form a package (tests/__init__.py), so shared helper
modules are imported by their package path, e.g. ``from tests.engine._engine_runs import train_cmd``;
multi-process helpers live in the library (blindseg_dist.launcher)."""
from __future__ import annotations

import pytest

from tests.engine._engine_runs import tiny_shards


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory):
    """8 synthetic 64x128 GTA5-layout frames in 4 shards of 2, written once per test session (read-only:
    the training runs of tests/engine share them)."""
    return tiny_shards(tmp_path_factory.mktemp("train_shards"))
