"""Convert a lowered :class:`~stn_edge.graph.Graph` (ONNX semantics, NCHW) to a TFLite model.

Layout. ONNX activations are NCHW; TFLite's CONV_2D, DEPTHWISE_CONV_2D and pools are NHWC. Every
value keeps a *storage permutation*: the TFLite tensor holds ``logical.transpose(perm)`` (NHWC is
``perm = (0, 2, 3, 1)``). Convolutions and pools ask for NHWC, elementwise ops and activations
keep whatever layout comes in, axis-taking ops (Concat, Softmax, reductions, Slice, Split) map
their axes, ONNX ``Transpose`` only changes the permutation, and a TRANSPOSE is emitted only where
an op needs another layout (Flatten/Reshape/MatMul need the logical order; so do graph outputs),
once per value and layout. A transpose that moves only size-1 axes is emitted as a RESHAPE.

Constants. A node whose inputs are all constant is folded with the numpy backend's implementation
(Shape -> Gather -> Concat -> Reshape chains become one RESHAPE), except matrix products and
convolutions, whose folding would multiply factorized layers back into dense weights.

Dynamic dims. :func:`build` converts the graph at the requested input shapes and at shapes with
every symbolic dim one larger. A dim that differs between the two is dynamic: RESHAPE targets put
``-1`` there and tensors carry a ``shape_signature``. When both conversions give the same
operators and constants the model is *resizable*: the interpreter can ``resize_tensor_input`` to
another batch instead of rebuilding the model.

Unsupported ops and variants raise :class:`~stn_edge.errors.UnsupportedOp` naming the op, the
node and the backends that can run it. :func:`supported_ops` lists the ONNX ops converted.

The converter lives in :mod:`.converter`; each op group registers its conversions from its own
module (:mod:`.elementwise`, :mod:`.normalization`, :mod:`.matmul`, :mod:`.conv_pool`,
:mod:`.reductions`, :mod:`.shapes`), and :mod:`.building` converts and serializes a graph.
"""
from stn_edge.device.backends.tflite_builder import conv_pool, elementwise, matmul, normalization, reductions, shapes  # noqa: F401  (each registers its conversions)
from stn_edge.device.backends.tflite_builder.building import BuiltModel, build, convert
from stn_edge.device.backends.tflite_builder.converter import NHWC, Conversion, supported_ops

__all__ = ["NHWC", "BuiltModel", "Conversion", "build", "convert", "supported_ops"]
