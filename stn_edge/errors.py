"""The typed errors of stn-edge.

Every error the SDK raises on bad input derives from :class:`STNError`, so callers (and the CLI)
can catch one family. Each message names the thing that is wrong and what to do about it.
"""
from __future__ import annotations


class STNError(Exception):
    """Base class of every stn-edge error."""

    #: exit code the CLI uses for this family
    exit_code = 1


class ArtifactError(STNError):
    """A ``.stn`` file is corrupt, truncated, hostile, foreign, or of an unsupported version."""

    exit_code = 3


class BudgetError(STNError):
    """A memory budget cannot be parsed or cannot be met.

    ``smallest_feasible`` holds the smallest feasible budget in bytes when the budget was too small.
    """

    exit_code = 4

    def __init__(self, message: str, smallest_feasible: int | None = None):
        super().__init__(message)
        self.smallest_feasible = smallest_feasible


class BackendError(STNError):
    """A backend name is unknown or a backend failed to prepare a graph."""

    exit_code = 5


class BackendUnavailable(BackendError):
    """A backend's engine (or the requested device) is not available on this machine."""


class UnsupportedOp(BackendError):
    """A graph holds an operator that a backend cannot run."""

    def __init__(self, message: str, op: str = "", node: str = "", backends: tuple[str, ...] = ()):
        super().__init__(message)
        self.op = op
        self.node = node
        self.backends = backends


class InputError(STNError):
    """Inputs given to ``Runtime.run`` do not match the model's declared inputs."""

    exit_code = 6


class CaptureError(STNError):
    """A model could not be captured into a graph on the host."""

    exit_code = 7


class ChunkedBatchWarning(UserWarning):
    """``Runtime.run`` got a batch larger than the ``batch_size`` the memory plan counts and ran it
    in chunks (correct results, fewer samples per engine call). Load with a larger ``batch_size``
    to run it whole; filter this warning to silence it."""
