"""`python -m blindseg_dist ...` runs the `blindseg` CLI (so `accelerate launch -m blindseg_dist train ...` works)."""
import sys

from .cli import main

sys.exit(main())
