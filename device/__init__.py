"""The device side of stn-edge: :class:`Runtime` and its backends.

Installs and runs with numpy + msgpack alone; engines (onnxruntime, LiteRT, torch) are extras,
imported only when their backend is asked for.
"""
from stn_edge.device.runtime import Runtime, relative_error

__all__ = ["Runtime", "relative_error"]
