"""stn-edge: bake a compressed network once, fit it to any device's memory at load time.

``stn_edge`` is the contract shared by the host and the device: the artifact format, the planner,
the lowering of factorized layers to plain ops, the errors and the CLI. It imports numpy and
msgpack only. ``stn_edge.host`` (workstation) and ``stn_edge.device`` (edge) build on it.
"""
from stn_edge.errors import (
    ArtifactError,
    BackendError,
    BackendUnavailable,
    BudgetError,
    CaptureError,
    ChunkedBatchWarning,
    InputError,
    STNError,
    UnsupportedOp,
)

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "BackendError",
    "BackendUnavailable",
    "BudgetError",
    "CaptureError",
    "ChunkedBatchWarning",
    "InputError",
    "STNError",
    "UnsupportedOp",
    "__version__",
]
