"""The errors a user can fix and the exit codes of `blindseg`.

A leaf module (standard library only): the config, the command line, the trainer and the launcher
all import it, and it imports none of them.

The exit codes, per command and launcher, are tabled in docs/OPERATIONS.md, "Exit codes".
"""
from __future__ import annotations

EXIT_OK = 0  # finished, or stopped by SIGTERM/SIGINT after writing a checkpoint
EXIT_ERROR = 1  # an error
EXIT_CONFIG = 2  # a config or usage error, a missing or unreadable input
EXIT_NONFINITE = 3  # run.max_nonfinite non-finite losses in a row (checkpoint written)
EXIT_COLLECTIVE = 4  # a collective failed: another rank died or hung longer than run.dist_timeout_s

EXIT_PRIORITY = (EXIT_CONFIG, EXIT_NONFINITE, EXIT_ERROR, EXIT_COLLECTIVE)
"""A run's exit code from its ranks' codes: the first of these present (launcher.run_exit_code)."""


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key, the value and what is allowed."""


class UsageError(Exception):
    """A bad command-line value that argparse cannot check (exit 2, like a config error)."""


class ShardReadError(OSError):
    """A shard (or manifest) could not be read after its retries, or is incomplete."""

    def __init__(self, message: str, *, samples: int = 0, missing: bool = False):
        super().__init__(message)
        self.samples = samples  # complete samples read before the failure
        self.missing = missing  # the location answered "not found" (not retried)


class MissingBackendError(ImportError):
    """A URL scheme whose fsspec backend (or fsspec itself) is not installed."""


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, UsageError, MissingBackendError,
                                                ShardReadError)
"""The errors `blindseg` reports in one line and exits 2 for (no traceback)."""


def exit_code(err: BaseException, *, setup: bool = True) -> int:
    """The exit code for ``err``: 2 for a config error; 2 for the other USER_ERRORS while setting up
    (a one-process `blindseg` command, a rank before its first step); 1 otherwise."""
    if isinstance(err, ConfigError) or (setup and isinstance(err, USER_ERRORS)):
        return EXIT_CONFIG
    return EXIT_ERROR

