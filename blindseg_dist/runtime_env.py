"""Process environment defaults that must be set before torch is imported.

``THP_MEM_ALLOC_ENABLE=1``: PyTorch's CPU allocator then backs every buffer of 2 MB or more with
transparent huge pages (it aligns the buffer to 2 MB and asks the kernel for huge pages with
madvise). Without it, glibc hands each large freed buffer back to the kernel and the next
allocation faults it in again 4 KB at a time: 4-5 million page faults per R50 training step at
crop 768 on the CPU, and about a million more for the BlindNet step than for two-view CE, whose
losses allocate fewer large temporaries (docs/BENCHMARKS.md, "What a BlindNet step costs"). torch reads the
variable once, at its first CPU allocation, so it has to be in the environment before
``import torch``: ``blindseg`` sets it first thing, and :func:`blindseg_dist.launcher.launch_env`
passes it to every process it starts. A value the user set is kept (``THP_MEM_ALLOC_ENABLE=0``
turns it off). It changes nothing where the kernel's transparent huge pages are ``never``, and
nothing for CUDA memory, which has its own caching allocator.

This module imports nothing heavy: it is imported before torch.
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping

DEFAULTS = {"THP_MEM_ALLOC_ENABLE": "1"}


def apply_defaults(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Add :data:`DEFAULTS` to ``env`` (default: this process's environment) where unset."""
    env = os.environ if env is None else env
    for key, value in DEFAULTS.items():
        env.setdefault(key, value)
    return env
