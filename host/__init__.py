"""The host side of stn-edge: capture, train with a low-rank regularizer, decompose, bake.

Needs the ``host`` extra (torch, onnx, onnxruntime).
"""
from stn_edge.host.bake import BakeReport, bake
from stn_edge.host.compress import CompressedModel, compress
from stn_edge.host.export import capture, export_onnx
from stn_edge.host.finetune import BudgetSampledFinetuner
from stn_edge.host.regularizer import LowRankRegularizer

__all__ = ["BakeReport", "BudgetSampledFinetuner", "CompressedModel", "compress", "LowRankRegularizer", "bake", "capture", "export_onnx"]
