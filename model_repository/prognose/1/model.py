"""Triton python backend (BLS): volume + T1 + EHR note -> risk and image features (see serving/triton_models.py)."""
import triton_python_backend_utils as pb_utils

from serving.triton_models import prognose_model

TritonPythonModel = prognose_model(pb_utils)
