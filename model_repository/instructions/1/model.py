"""Triton python backend: canonical targets + image context -> one instruction per target (Zeus's generator, before
the tokenizer; see serving/triton_models.py)."""
import triton_python_backend_utils as pb_utils

from serving.triton_models import instructions_model

TritonPythonModel = instructions_model(pb_utils)
