"""Command-line tools built on top of the library (flops, reports, demos)."""
