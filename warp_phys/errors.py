"""Error types the CLI turns into one clear line and exit code 2."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


class DivergenceError(UserError):
    """A trajectory left the finite numbers during integration."""


class StoreError(UserError):
    """A store is missing, truncated, or not one of ours."""


class RankError(UserError):
    """Under torchrun, an error of one process other than rank 0 (its own disk or GPU, say):
    that process reports it (rank 0 reports the errors every process meets alike)."""
