"""Export: checkpoint -> adapters merged -> ONNX units with parity -> TensorRT engines -> Triton repository
(``python export/build_engines.py``)."""
