"""Export of the DuPLUS units (text encoder, conditioning, segmenter) to ONNX / TensorRT and
generation of the Triton model repository (`python export/build_engines.py`; next issue)."""
