"""Preload module of the training loader's forkserver (imported only there, by multiprocessing's
forkserver before it forks any worker): see blindseg_dist/data/workers.py."""
from blindseg_dist.data.workers import guard_forkserver

guard_forkserver()

import blindseg_dist.data.stream  # noqa: E402,F401  (preloaded: cheap worker start)
