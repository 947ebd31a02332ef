"""titled_grid, the layout of the demo's panels.png: every section exactly as wide (cells scaled to fill
it, none left blank), column titles written above their columns, row labels in the first cell."""
from __future__ import annotations

import numpy as np
import pytest

from blindseg_dist.engine.figures import titled_grid


def _cell(h, w, colour):
    return np.full((h, w, 3), colour, np.uint8)


def test_sections_fill_one_width_with_titles_and_labels():
    train = [(f"crop {i}", [_cell(32, 32, (200, 0, 0)), _cell(32, 32, (0, 200, 0)), _cell(32, 32, (0, 0, 200)),
                            _cell(32, 32, (100, 100, 0))]) for i in range(2)]
    target = [("night", [_cell(64, 128, (10, 10, 10)), _cell(64, 128, (0, 100, 100)), _cell(64, 128, (90, 0, 90))])]
    grid = titled_grid([("training", ["input", "augmented view", "ground truth", "prediction"], train),
                        ("targets", ["input", "ground truth", "prediction"], target)], gap=4, font_size=15)
    strip = 2 * (15 + 6)
    width = 3 * 128 + 2 * 4  # the widest section at its own size
    cell = (width - 3 * 4) // 4  # 95: the 4 training columns share it
    assert grid.shape == (strip + cell + 4 + cell + strip + 64, width, 3)
    # every column of every cell row holds its colour: nothing blank on the right
    y = strip + cell // 2
    for k, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200), (100, 100, 0)]):
        x = k * (cell + 4) + cell // 2
        assert tuple(grid[y, x]) == colour
    assert tuple(grid[-1, -1]) == (90, 0, 90) and tuple(grid[strip + cell - 1, width - 1]) == (100, 100, 0)
    # the titles: dark text in the strip above each column, and the row label's black box in the first cell
    for k in range(4):
        x0 = k * (cell + 4)
        assert (grid[21:strip, x0:x0 + cell] < 100).any(), k
    assert (grid[strip:strip + 20, :40] == 0).all(axis=2).any() and (grid[strip:strip + 20, :40] > 200).any()
    with pytest.raises(ValueError, match="3 cells for 4 columns"):
        titled_grid([("t", ["a", "b", "c", "d"], [("r", [_cell(8, 8, 0)] * 3)])])
