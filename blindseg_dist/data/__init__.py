"""Data: label tables, dataset readers, the synthetic generator and the sharder.

Submodules are imported on use (``from blindseg_dist.data import shards``); only the label
constants are re-exported here so that importing the package stays cheap.
"""
from .labels import CLASS_NAMES, IGNORE, NUM_CLASSES, PALETTE

__all__ = ["CLASS_NAMES", "IGNORE", "NUM_CLASSES", "PALETTE"]
