"""Triton python backend (BLS): a volume in its own geometry [+ a T1 prompt] -> its context (Biomed-DPT), a T1 prompt for it and the verdict on the request's T1 (see serving/triton_models.py)."""
import triton_python_backend_utils as pb_utils

from serving.triton_models import classify_context_model

TritonPythonModel = classify_context_model(pb_utils)
