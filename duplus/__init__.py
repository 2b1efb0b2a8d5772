"""The DuPLUS core: prompt vocabulary, tensor contract and serving limits, pre- and post-processing, the one
inference pipeline, the model families (``duplus.models``), the text encoder and the synthetic data
(``duplus.synth``). It imports nothing from training/, export/, serving/, clients/ or perf/."""
