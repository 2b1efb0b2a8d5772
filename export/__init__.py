"""Export: checkpoint -> adapters merged -> per unit (``export.stages.export_unit``) ONNX with parity -> TensorRT engines
with parity (int8 calibrated by ``export.calibration``) -> Triton repository (``export.repository``);
``python export/build_engines.py``."""
