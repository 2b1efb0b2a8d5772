"""Triton python backend: the exported PEMMA unit (CT and/or PET windows) on ONNX Runtime, TensorRT or PyTorch (see serving/triton_models.py)."""
import triton_python_backend_utils as pb_utils

from serving.triton_models import unit_model

TritonPythonModel = unit_model(pb_utils, "pemma_segmenter")
