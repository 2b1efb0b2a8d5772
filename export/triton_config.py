"""Triton ``config.pbtxt`` generated from typed objects, never edited by hand.

Frozen dataclasses describe each model (tensors, instance groups, response cache, warm-up,
ensemble steps); ``ModelConfig.to_proto`` turns one into Triton's own protobuf message
(``tritonclient.grpc.model_config_pb2.ModelConfig``), so a field Triton does not know is an error
at build time, and ``pbtxt`` is that message in protobuf text format.

``repository_models`` is the ensemble graph, the same for both flavours:

    encode_prompts (ensemble)   MODALITY, T1, TARGETS -> MODALITY_INDEX, FILM, HEAD_PARAMS, TARGET_EMBEDDING
        tokenizer -> text_encoder (T1) -> text_encoder (targets) -> conditioning
    segment_patch (ensemble)    IMAGE patch + MODALITY, T1, TARGETS -> PROBABILITIES, LOGITS
        tokenizer -> text_encoder x2 -> conditioning -> segmenter
    encode_instructions (ensemble)  MODALITY, T1, TARGETS (canonical), CONTEXT -> encode_prompts' outputs + INSTRUCTIONS
        instructions (Zeus's generator, before the tokenizer) -> tokenizer -> text_encoder x2 -> conditioning
    segment_volume (python BLS) VOLUME + AFFINE + MODALITY, T1, TARGETS [+ INSTRUCTIONS, CONTEXT, STRICT_CONTEXT]
        -> LABELS (uint8, input grid), RESOLVED_TARGETS, SIMILARITY, STEM, CONDITIONING_TEXTS, CONTEXT_VERDICT
        checks -> T1 guard (views once -> context_classifier, when built; STRICT_CONTEXT refuses a contradicting
        T1) -> preprocessing -> encode_prompts once (matching) [-> encode_instructions once with INSTRUCTIONS
        auto] -> segmenter on batched windows -> inverse -> labels
    prognose (python BLS)       VOLUME + AFFINE + MODALITY, T1, EHR -> RISK, IMAGE_FEATURES, FEATURE_NAMES
        EHR checks + tokens -> encode_prompts (T1; tumour, node) once -> image_features (one pass at model
        spacing) -> radiomics + pooled features; text_encoder_ehr (LoRA merged) -> prognosis head -> risk
        (present when the repository is built with a prognosis checkpoint)
    segment_petct (python BLS)  CT + CT_AFFINE and/or PET + PET_AFFINE (each optional) -> LABELS (uint8, the CT's grid,
        the PET's without a CT), MODE, LABEL_NAMES
        checks -> PET resampled into the CT's frame at model spacing -> pemma_segmenter on batched windows (the
        mode index picks CT, PET or both inside the one graph) -> probabilities back on the grid -> argmax
        (present when the repository is built with a PEMMA checkpoint)
    classify_context (python BLS) VOLUME + AFFINE [+ T1] -> PROBABILITIES, CLASSES, CONTEXT, CONTEXT_T1, VERDICT
        checks -> three world-space views -> context_classifier -> the best context, its T1 prompt, and the
        verdict on the request's T1 (present when the repository is built with a context checkpoint)

``embedded`` runs text_encoder / conditioning / segmenter as python-backend models (ONNX Runtime,
TensorRT or PyTorch inside); ``ngc`` makes them native ``onnxruntime_onnx`` / ``tensorrt_plan`` models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf import text_format

from duplus.contract import ServingLimits, UnitContract

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
                 "int32": "TYPE_INT32", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL", "bytes": "TYPE_STRING"}
KINDS = ("KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL")
FLAVOURS = ("embedded", "ngc")
ENGINES = ("onnxruntime", "tensorrt", "torch")
PYTHON_MODELS_EMBEDDED = ("instructions", "tokenizer", "text_encoder", "conditioning", "segmenter", "segment_volume",
                          "image_features", "text_encoder_ehr", "prognosis", "prognose", "pemma_segmenter",
                          "segment_petct", "context_classifier", "classify_context")
PYTHON_MODELS_NGC = ("instructions", "tokenizer", "segment_volume", "prognose", "segment_petct", "classify_context")
#: the instruction generator's configuration (duplus.instructions.GeneratorConfig) in instructions/1/
GENERATOR_CONFIG = "generator.yaml"
PROGNOSIS_UNITS = ("image_features", "text_encoder_ehr", "prognosis")


def _pb():
    from tritonclient.grpc import model_config_pb2  # Triton's own schema

    return model_config_pb2


@dataclass(frozen=True)
class TritonTensor:
    name: str
    dtype: str                     # numpy-style name, "bytes" for TYPE_STRING
    dims: tuple[int, ...]          # -1 for a dynamic axis (no batch axis: all models use max_batch_size 0)
    optional: bool = False         # an input a request may leave out

    def __post_init__(self) -> None:
        if self.dtype not in TRITON_DTYPES:
            raise ValueError(f"tensor {self.name}: unsupported dtype {self.dtype!r}; one of {sorted(TRITON_DTYPES)}")
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        if not self.dims or any(d == 0 or d < -1 for d in self.dims):
            raise ValueError(f"tensor {self.name}: dims must be positive or -1, got {self.dims}")

    @classmethod
    def from_contract(cls, spec) -> TritonTensor:
        return cls(spec.name, spec.dtype, tuple(-1 if isinstance(d, str) else d for d in spec.shape))


@dataclass(frozen=True)
class InstanceGroup:
    count: int = 1
    kind: str = "KIND_CPU"

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"instance_group.count must be >= 1, got {self.count}")
        if self.kind not in KINDS:
            raise ValueError(f"instance_group.kind {self.kind!r} is not one of {KINDS}")


@dataclass(frozen=True)
class EnsembleStep:
    model_name: str
    input_map: tuple[tuple[str, str], ...]    # (the step model's input, ensemble tensor)
    output_map: tuple[tuple[str, str], ...]   # (the step model's output, ensemble tensor)


@dataclass(frozen=True)
class Warmup:
    """One warm-up request of zeros (the python-backend units load their runner on it)."""

    name: str
    inputs: tuple[TritonTensor, ...]   # concrete dims


@dataclass(frozen=True)
class ModelConfig:
    name: str
    inputs: tuple[TritonTensor, ...]
    outputs: tuple[TritonTensor, ...]
    backend: str | None = None            # "python", "onnxruntime", "tensorrt"
    platform: str | None = None           # "ensemble", "onnxruntime_onnx", "tensorrt_plan"
    instance_groups: tuple[InstanceGroup, ...] = ()
    response_cache: bool = False
    parameters: tuple[tuple[str, str], ...] = ()
    steps: tuple[EnsembleStep, ...] = ()
    warmup: tuple[Warmup, ...] = ()
    default_model_filename: str = ""

    def __post_init__(self) -> None:
        if not self.backend and not self.platform:
            raise ValueError(f"model {self.name}: give a backend or a platform")
        if self.platform == "ensemble" and not self.steps:
            raise ValueError(f"ensemble {self.name} has no steps")
        names = [t.name for t in self.inputs] + [t.name for t in self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"model {self.name}: duplicate tensor names {names}")

    def to_proto(self):
        pb = _pb()
        # max_batch_size 0: K targets and sliding-window patches are not a batch axis Triton may split or merge
        m = pb.ModelConfig(name=self.name, max_batch_size=0)
        if self.backend:
            m.backend = self.backend
        if self.platform:
            m.platform = self.platform
        if self.default_model_filename:
            m.default_model_filename = self.default_model_filename
        for t in self.inputs:
            m.input.add(name=t.name, data_type=pb.DataType.Value(TRITON_DTYPES[t.dtype]), dims=list(t.dims),
                        optional=t.optional)
        for t in self.outputs:
            m.output.add(name=t.name, data_type=pb.DataType.Value(TRITON_DTYPES[t.dtype]), dims=list(t.dims))
        for g in self.instance_groups:
            m.instance_group.add(count=g.count, kind=pb.ModelInstanceGroup.Kind.Value(g.kind))
        if self.response_cache:
            m.response_cache.enable = True
        for k, v in self.parameters:
            m.parameters[k].string_value = str(v)
        for s in self.steps:
            step = m.ensemble_scheduling.step.add(model_name=s.model_name, model_version=-1)
            for k, v in s.input_map:
                step.input_map[k] = v
            for k, v in s.output_map:
                step.output_map[k] = v
        for w in self.warmup:
            sample = m.model_warmup.add(name=w.name, batch_size=1, count=1)
            for t in w.inputs:
                inp = sample.inputs[t.name]
                inp.data_type = pb.DataType.Value(TRITON_DTYPES[t.dtype])
                inp.dims.extend(t.dims)
                inp.zero_data = True
        return m

    def pbtxt(self) -> str:
        return text_format.MessageToString(self.to_proto())


def parse_pbtxt(text: str):
    """Parse a config.pbtxt with Triton's own schema (unknown fields are an error)."""
    return text_format.Parse(text, _pb().ModelConfig())


@dataclass(frozen=True)
class RepositoryOptions:
    flavour: str = "embedded"
    engine: str = "onnxruntime"
    device: str = "cpu"                          # "cpu" | "gpu": instance kind of the compute models
    segmenter_instances: int = 1
    threads: int = 0                             # ONNX Runtime intra-op threads per instance (0: all cores)
    ort_optimization: str = "all"                # ONNX Runtime graph optimisation level
    patch_size: tuple[int, int, int] = (96, 96, 64)
    limits: ServingLimits = field(default_factory=ServingLimits)

    def __post_init__(self) -> None:
        if self.flavour not in FLAVOURS:
            raise ValueError(f"flavour must be one of {FLAVOURS}, got {self.flavour!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {self.device!r}")
        if self.flavour == "ngc" and self.engine == "torch":
            raise ValueError("the ngc flavour serves native onnxruntime_onnx or tensorrt_plan models, not torch")
        if self.ort_optimization not in ("disable", "basic", "extended", "all"):
            raise ValueError(f"ort_optimization must be disable, basic, extended or all, got {self.ort_optimization!r}")
        if self.segmenter_instances < 1:
            raise ValueError("segmenter_instances must be >= 1")

    @property
    def python_models(self) -> tuple[str, ...]:
        return PYTHON_MODELS_EMBEDDED if self.flavour == "embedded" else PYTHON_MODELS_NGC


S = "bytes"


def _t(name, dtype, *dims, optional: bool = False) -> TritonTensor:
    return TritonTensor(name, dtype, tuple(dims), optional)


def repository_models(units: dict[str, UnitContract], opts: RepositoryOptions) -> list[ModelConfig]:
    """Every model of the repository, in dependency order."""
    kind = "KIND_GPU" if opts.device == "gpu" else "KIND_CPU"
    e = units["text_encoder"].outputs[0].shape[-1]
    film = units["conditioning"].outputs[0].shape[-1]
    head = units["conditioning"].outputs[1].shape[-1]
    px, py, pz = opts.patch_size
    lim = opts.limits
    unit_params = (("engine", opts.engine), ("threads", str(opts.threads)), ("ort_optimization", opts.ort_optimization))
    models: list[ModelConfig] = []

    models.append(ModelConfig(
        "instructions", backend="python", inputs=(_t("TARGETS", S, -1), _t("CONTEXT", S, 1)),
        outputs=(_t("INSTRUCTIONS", S, -1),), instance_groups=(InstanceGroup(1, "KIND_CPU"),),
        parameters=(("generator_config", GENERATOR_CONFIG),)))
    models.append(ModelConfig(
        "tokenizer", backend="python",
        inputs=(_t("MODALITY", S, 1), _t("T1", S, 1), _t("TARGETS", S, -1)),
        outputs=(_t("modality", "int64", 1), _t("t1_input_ids", "int64", 1, -1),
                 _t("t1_attention_mask", "int64", 1, -1), _t("t2_input_ids", "int64", -1, -1),
                 _t("t2_attention_mask", "int64", -1, -1)),
        instance_groups=(InstanceGroup(1, "KIND_CPU"),), parameters=lim.parameters()))

    def unit_model(name: str, warm: Warmup | None, cache: bool, instances: int = 1) -> ModelConfig:
        c = units[name]
        native = opts.flavour == "ngc"
        platform = ("tensorrt_plan" if opts.engine == "tensorrt" else "onnxruntime_onnx") if native else None
        return ModelConfig(
            name, backend=None if native else "python", platform=platform,
            inputs=tuple(TritonTensor.from_contract(s) for s in c.inputs),
            outputs=tuple(TritonTensor.from_contract(s) for s in c.outputs),
            instance_groups=(InstanceGroup(instances, kind),), response_cache=cache,
            parameters=() if native else unit_params, warmup=(warm,) if warm else (),
            default_model_filename=("model.plan" if opts.engine == "tensorrt" else "model.onnx") if native else "")

    # Triton's response cache only for native units (ngc): Triton 2.51 caches a python-backend model's error
    # response as an empty success (a repeated malformed request to text_encoder came back OK with no outputs);
    # the embedded flavour relies on the prompt-set LRU inside segment_volume / prognose instead
    text_cache = opts.flavour == "ngc"
    models.append(unit_model("text_encoder", Warmup("prompt", (
        _t("input_ids", "int64", 1, 8), _t("attention_mask", "int64", 1, 8))), cache=text_cache))
    models.append(unit_model("conditioning", None, cache=text_cache))
    models.append(unit_model("segmenter", Warmup("patch", (
        _t("image", "float32", 1, 1, px, py, pz), _t("modality", "int64", 1), _t("film", "float32", 1, film),
        _t("head_params", "float32", 1, head))),
        cache=False, instances=opts.segmenter_instances))

    prompt_steps = (
        EnsembleStep("tokenizer", (("MODALITY", "MODALITY"), ("T1", "T1"), ("TARGETS", "TARGETS")),
                     (("modality", "MODALITY_INDEX"), ("t1_input_ids", "t1_ids"), ("t1_attention_mask", "t1_mask"),
                      ("t2_input_ids", "t2_ids"), ("t2_attention_mask", "t2_mask"))),
        EnsembleStep("text_encoder", (("input_ids", "t1_ids"), ("attention_mask", "t1_mask")),
                     (("embedding", "t1_embedding"),)),
        EnsembleStep("text_encoder", (("input_ids", "t2_ids"), ("attention_mask", "t2_mask")),
                     (("embedding", "TARGET_EMBEDDING"),)),
        EnsembleStep("conditioning", (("t1_embedding", "t1_embedding"), ("t2_embedding", "TARGET_EMBEDDING")),
                     (("film", "FILM"), ("head_params", "HEAD_PARAMS"))),
    )
    prompt_inputs = (_t("MODALITY", S, 1), _t("T1", S, 1), _t("TARGETS", S, -1))
    models.append(ModelConfig(
        "encode_prompts", platform="ensemble", inputs=prompt_inputs,
        outputs=(_t("MODALITY_INDEX", "int64", 1), _t("FILM", "float32", 1, film),
                 _t("HEAD_PARAMS", "float32", -1, head), _t("TARGET_EMBEDDING", "float32", -1, e)),
        steps=prompt_steps))
    models.append(ModelConfig(
        "encode_instructions", platform="ensemble", inputs=prompt_inputs + (_t("CONTEXT", S, 1),),
        outputs=(_t("MODALITY_INDEX", "int64", 1), _t("FILM", "float32", 1, film),
                 _t("HEAD_PARAMS", "float32", -1, head), _t("TARGET_EMBEDDING", "float32", -1, e),
                 _t("INSTRUCTIONS", S, -1)),
        steps=(EnsembleStep("instructions", (("TARGETS", "TARGETS"), ("CONTEXT", "CONTEXT")),
                            (("INSTRUCTIONS", "INSTRUCTIONS"),)),
               EnsembleStep("tokenizer", (("MODALITY", "MODALITY"), ("T1", "T1"), ("TARGETS", "INSTRUCTIONS")),
                            prompt_steps[0].output_map)) + prompt_steps[1:]))
    models.append(ModelConfig(
        "segment_patch", platform="ensemble", inputs=(_t("IMAGE", "float32", 1, 1, -1, -1, -1),) + prompt_inputs,
        outputs=(_t("PROBABILITIES", "float32", 1, -1, -1, -1, -1), _t("LOGITS", "float32", 1, -1, -1, -1, -1)),
        steps=(prompt_steps[0], prompt_steps[1],
               EnsembleStep("text_encoder", (("input_ids", "t2_ids"), ("attention_mask", "t2_mask")),
                            (("embedding", "t2_embedding"),)),
               EnsembleStep("conditioning", (("t1_embedding", "t1_embedding"), ("t2_embedding", "t2_embedding")),
                            (("film", "film"), ("head_params", "head_params"))),
               EnsembleStep("segmenter", (("image", "IMAGE"), ("modality", "MODALITY_INDEX"), ("film", "film"),
                                          ("head_params", "head_params")),
                            (("logits", "LOGITS"), ("probabilities", "PROBABILITIES"))))))
    context = "context_classifier" in units
    if context:   # segment_volume's T1 guard calls it: loaded before it
        models.append(unit_model("context_classifier", None, cache=False))
    models.append(ModelConfig(
        "segment_volume", backend="python",
        inputs=(_t("VOLUME", "float32", -1, -1, -1), _t("AFFINE", "float64", 4, 4)) + prompt_inputs +
               (_t("INSTRUCTIONS", S, 1, optional=True), _t("CONTEXT", S, 1, optional=True),
                _t("STRICT_CONTEXT", "bool", 1, optional=True)),
        outputs=(_t("LABELS", "uint8", -1, -1, -1), _t("RESOLVED_TARGETS", S, -1), _t("SIMILARITY", "float32", -1),
                 _t("STEM", S, 1), _t("CONDITIONING_TEXTS", S, -1), _t("CONTEXT_VERDICT", S, 1)),
        instance_groups=(InstanceGroup(1, "KIND_CPU"),),
        parameters=lim.parameters() + (("patch_size", ",".join(map(str, opts.patch_size))),)))
    if all(u in units for u in PROGNOSIS_UNITS):
        models.append(unit_model("image_features", None, cache=False))
        models.append(unit_model("text_encoder_ehr", None, cache=text_cache))
        models.append(unit_model("prognosis", None, cache=False))
        models.append(ModelConfig(
            "prognose", backend="python",
            inputs=(_t("VOLUME", "float32", -1, -1, -1), _t("AFFINE", "float64", 4, 4), _t("MODALITY", S, 1),
                    _t("T1", S, 1), _t("EHR", S, 1)),
            outputs=(_t("RISK", "float32", 1), _t("IMAGE_FEATURES", "float32", -1), _t("FEATURE_NAMES", S, -1)),
            instance_groups=(InstanceGroup(1, "KIND_CPU"),), parameters=lim.parameters()))
    if "pemma_segmenter" in units:
        models.append(unit_model("pemma_segmenter", None, cache=False))
        volume = (-1, -1, -1)
        models.append(ModelConfig(
            "segment_petct", backend="python",
            inputs=(_t("CT", "float32", *volume, optional=True), _t("CT_AFFINE", "float64", 4, 4, optional=True),
                    _t("PET", "float32", *volume, optional=True), _t("PET_AFFINE", "float64", 4, 4, optional=True)),
            outputs=(_t("LABELS", "uint8", *volume), _t("MODE", S, 1), _t("LABEL_NAMES", S, -1)),
            instance_groups=(InstanceGroup(1, "KIND_CPU"),), parameters=lim.parameters()))
    if context:
        c = units["context_classifier"].outputs[0].shape[-1]
        models.append(ModelConfig(
            "classify_context", backend="python",
            inputs=(_t("VOLUME", "float32", -1, -1, -1), _t("AFFINE", "float64", 4, 4), _t("T1", S, 1, optional=True)),
            outputs=(_t("PROBABILITIES", "float32", c), _t("CLASSES", S, c), _t("CONTEXT", S, 1),
                     _t("CONTEXT_T1", S, 1), _t("VERDICT", S, 1)),
            instance_groups=(InstanceGroup(1, "KIND_CPU"),), parameters=lim.parameters()))
    return models
