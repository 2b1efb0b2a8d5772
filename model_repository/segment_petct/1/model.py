"""Triton python backend (BLS): CT, PET or both, each in its own geometry -> PEMMA labels on the CT's grid (see serving/triton_models.py)."""
import triton_python_backend_utils as pb_utils

from serving.triton_models import segment_petct_model

TritonPythonModel = segment_petct_model(pb_utils)
