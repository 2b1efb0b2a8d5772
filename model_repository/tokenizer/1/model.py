"""Triton python backend: prompt validation and tokenisation (see serving/triton_models.py)."""
import triton_python_backend_utils as pb_utils

from serving.triton_models import tokenizer_model

TritonPythonModel = tokenizer_model(pb_utils)
