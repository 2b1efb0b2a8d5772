"""What runs inside Triton (unit runners, request checks, the BLS pipelines, the ``TritonPythonModel`` classes)
and the server launcher (``python -m serving.serve``)."""
