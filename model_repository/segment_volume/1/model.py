"""Triton python backend (BLS): whole volume -> uint8 labels in its own geometry (see serving/triton_models.py)."""
import triton_python_backend_utils as pb_utils

from serving.triton_models import segment_volume_model

TritonPythonModel = segment_volume_model(pb_utils)
