"""Triton python backend: the exported context classifier unit (three views -> context probabilities) on ONNX Runtime, TensorRT or PyTorch (see serving/triton_models.py)."""
import triton_python_backend_utils as pb_utils

from serving.triton_models import unit_model

TritonPythonModel = unit_model(pb_utils, "context_classifier")
