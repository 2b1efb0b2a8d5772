"""The Triton python-backend models (``TritonPythonModel`` classes).

Each ``model_repository/<model>/1/model.py`` is two lines that bind one of these factories to
``triton_python_backend_utils``, which only exists inside Triton's python-backend stub; the
logic itself lives in ``serving.pipelines`` and is tested without a server.

Errors: ``InvalidRequest`` (and its subclasses) -> INVALID_ARGUMENT with the message (at most
``MAX_ERROR_CHARS``: gRPC carries it in trailing metadata, and an over-long one turns into
RESOURCE_EXHAUSTED); a model that is unloading or whose stub died, met in a BLS call -> UNAVAILABLE (the
client retries); anything else -> INTERNAL with a generic message and an error id, the id and the
traceback in the server log. A failed request never takes the model down.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
import uuid
from pathlib import Path

import numpy as np

from duplus.contract import KNOWN_TARGETS, MAX_UNIT_BATCH, EncodedPrompts, InvalidRequest, ServingLimits, UnitContract
from serving.requests import EHRTokenizer, PromptTokenizer, check_feed, decode_strings, read_manifest, short

log = logging.getLogger("duplus.triton")

#: the units whose PyTorch runner builds MONAI blocks and never imports transformers (the others import no MONAI,
#: or transformers anyway: the text encoders, the prognosis head's checkpoint with its EHR encoder, PEMMA's peft)
MONAI_IMAGE_UNITS = ("segmenter", "image_features")


def import_monai_without_transformers() -> None:
    """Import MONAI in this process as in an environment without transformers (once, before a stub's pipeline).

    MONAI's package import loads every submodule, TransChex among them, which imports transformers' BERT whenever
    transformers is installed. No BLS stub runs a transformers model (their tokenizers run on the tokenizers
    library, ``serving.requests.WordTokenizer``), and neither does a PyTorch image unit. While MONAI is imported,
    ``sys.modules["transformers"] = None`` makes ``import transformers`` raise ModuleNotFoundError (the import
    system's documented way to mark a module missing), which MONAI's ``optional_import`` treats as the optional
    package being absent, as it supports; MONAI's code is untouched. The entry is removed right after, so code
    that does need transformers later imports it as usual. Importing ``serving.pipelines`` measured 8.0 s and
    528 MB of peak memory without this, 5.0 s and 419 MB with it (2 cores, 2026-12-05): per BLS stub, per start.
    A process that has MONAI or transformers already is left as it is.
    """
    if "monai" in sys.modules or "transformers" in sys.modules:
        return
    sys.modules["transformers"] = None
    try:
        import monai  # noqa: F401
    finally:
        if "transformers" in sys.modules and sys.modules["transformers"] is None:
            del sys.modules["transformers"]


def _context(args: dict) -> tuple[dict, Path, Path]:
    config = json.loads(args["model_config"])
    model_dir = Path(args["model_repository"])
    return config, model_dir, model_dir / args["model_version"]


def _params(config: dict) -> dict[str, str]:
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


class ServerUnavailable(RuntimeError):
    """A BLS call found the server shutting down or a model unloading: the client should retry."""


#: the longest error message a client gets (gRPC's trailing metadata is 8 KiB by default)
MAX_ERROR_CHARS = 1024


def _error(pb, exc: BaseException, model: str):
    if isinstance(exc, ServerUnavailable):
        code = getattr(pb.TritonError, "UNAVAILABLE", pb.TritonError.INTERNAL)
        return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(short(str(exc), MAX_ERROR_CHARS), code))
    if isinstance(exc, InvalidRequest):
        return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(short(str(exc), MAX_ERROR_CHARS),
                                                                            pb.TritonError.INVALID_ARG))
    error_id = str(uuid.uuid4())
    text = f"{model}: internal error {error_id}: " + "".join(traceback.format_exception(exc))
    logger = getattr(pb, "Logger", None)    # Triton's own log (python-backend stubs of 2.51 have it)
    if logger is not None:
        logger.log_error(text)
    else:
        log.error("%s", text)
    return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(
        f"internal error in {model} (error id {error_id}; the server log has the details)", pb.TritonError.INTERNAL))


def _string_tensor(pb, name: str, values) -> object:
    return pb.Tensor(name, np.array([str(v).encode("utf-8") for v in values], dtype=np.object_))


def _input(pb, request, name: str) -> np.ndarray:
    t = pb.get_input_tensor_by_name(request, name)
    if t is None:
        raise InvalidRequest(f"input {name} is missing")
    return t.as_numpy()


def _one_string(pb, request, name: str, optional: bool = False) -> str | None:
    if optional and pb.get_input_tensor_by_name(request, name) is None:
        return None
    values = decode_strings(_input(pb, request, name), name)
    if len(values) != 1:
        raise InvalidRequest(f"input {name} must hold exactly one string, got {len(values)}")
    return values[0]


def _flag(pb, request, name: str) -> bool:
    """An optional BOOL [1] input (False when absent)."""
    t = pb.get_input_tensor_by_name(request, name)
    if t is None:
        return False
    x = np.asarray(t.as_numpy())
    if x.size != 1:
        raise InvalidRequest(f"input {name} must hold exactly one boolean, got {x.size} values")
    return bool(x.reshape(-1)[0])


def _volume_request(pb, request) -> tuple[np.ndarray, np.ndarray, str, str]:
    """VOLUME, AFFINE, MODALITY and T1 of a segment_volume / prognose request."""
    return (_input(pb, request, "VOLUME"), _input(pb, request, "AFFINE"), _one_string(pb, request, "MODALITY"),
            _one_string(pb, request, "T1"))


def _image_feed(pb, image, modality, film, head_params) -> list:
    """The inputs of the segmenter and image_features units (one contract) as BLS tensors."""
    return [pb.Tensor("image", np.ascontiguousarray(image, dtype=np.float32)), pb.Tensor("modality", modality),
            pb.Tensor("film", np.ascontiguousarray(film)), pb.Tensor("head_params", np.ascontiguousarray(head_params))]


def instructions_model(pb):
    """Zeus's generator in the graph: TARGETS (canonical names or synonyms) + CONTEXT (JSON of
    ``duplus.instructions.ImageContext`` fields, modality included) -> INSTRUCTIONS, one per target. The backend is
    ``instructions/1/generator.yaml``; a language model's failure falls back to the knowledge base (logged), so a
    valid request always gets instructions. Its LRU caches them per (target, context)."""

    class TritonPythonModel:
        def initialize(self, args):
            from duplus.instructions import GeneratorConfig, make_generator

            config, model_dir, version_dir = _context(args)
            self.max_targets = MAX_UNIT_BATCH
            params = _params(config)
            manifest = read_manifest(model_dir.parent)
            tokenizer = PromptTokenizer(model_dir.parent / "tokenizer" / args["model_version"] / "tokenizer",
                                        manifest["model_config"]["modalities"])
            cfg = GeneratorConfig.from_yaml(version_dir / params.get("generator_config", "generator.yaml"))
            self.generator = make_generator(cfg, count_tokens=tokenizer.count_tokens)
            log.info("instructions: %s backend", cfg.backend)

        def execute(self, requests):
            from duplus.instructions import REQUEST_CONTEXT_FIELDS, context_fields, image_context, served_instructions

            responses = []
            for request in requests:
                try:
                    targets = decode_strings(_input(pb, request, "TARGETS"), "TARGETS")
                    if not 1 <= len(targets) <= self.max_targets:
                        raise InvalidRequest(f"TARGETS must hold 1 to {self.max_targets} targets, got {len(targets)}")
                    # here CONTEXT names the modality too (encode_instructions gets the request's whole context)
                    context = image_context(**context_fields(_one_string(pb, request, "CONTEXT"),
                                                             ("modality",) + REQUEST_CONTEXT_FIELDS))
                    try:
                        texts = served_instructions(self.generator, targets, context)
                    except ValueError as e:                # an unknown target
                        raise InvalidRequest(str(e)) from None
                    responses.append(pb.InferenceResponse([_string_tensor(pb, "INSTRUCTIONS", texts)]))
                except Exception as exc:  # noqa: BLE001
                    responses.append(_error(pb, exc, "instructions"))
            return responses

    return TritonPythonModel


def tokenizer_model(pb):
    class TritonPythonModel:
        def initialize(self, args):
            config, model_dir, version_dir = _context(args)
            manifest = read_manifest(model_dir.parent)
            limits = ServingLimits.from_parameters(config.get("parameters", {}))
            self.tokenizer = PromptTokenizer(version_dir / "tokenizer", manifest["model_config"]["modalities"], limits)

        def execute(self, requests):
            responses = []
            for request in requests:
                try:
                    modality, t1 = _one_string(pb, request, "MODALITY"), _one_string(pb, request, "T1")
                    targets = decode_strings(_input(pb, request, "TARGETS"), "TARGETS")
                    out = self.tokenizer(modality, t1, targets)
                    responses.append(pb.InferenceResponse([pb.Tensor(k, v) for k, v in out.items()]))
                except Exception as exc:  # noqa: BLE001 - every failure becomes an error response
                    responses.append(_error(pb, exc, "tokenizer"))
            return responses

    return TritonPythonModel


def unit_model(pb, unit: str):
    """text_encoder / conditioning / segmenter on ONNX Runtime, TensorRT or PyTorch."""

    class TritonPythonModel:
        def initialize(self, args):
            from serving.runtime import make_runner

            config, model_dir, version_dir = _context(args)
            params = _params(config)
            if params.get("engine", "onnxruntime") == "torch" and unit in MONAI_IMAGE_UNITS:
                import_monai_without_transformers()
            manifest = read_manifest(model_dir.parent)
            self.contract = UnitContract.from_manifest(unit, manifest["units"][unit])
            gpu = args.get("model_instance_kind") == "GPU"
            self.runner = make_runner(unit, version_dir, self.contract, params.get("engine", "onnxruntime"), gpu=gpu,
                                      device_id=int(args.get("model_instance_device_id", 0)),
                                      threads=int(params.get("threads", 0)),
                                      optimization=params.get("ort_optimization", "all"),
                                      checkpoint=model_dir.parent / "checkpoint.pt")

        def execute(self, requests):
            responses = []
            for request in requests:
                try:
                    feed = check_feed(self.contract, {t.name: _input(pb, request, t.name) for t in self.contract.inputs})
                    out = self.runner(feed)
                    responses.append(pb.InferenceResponse([pb.Tensor(k, np.ascontiguousarray(v))
                                                           for k, v in out.items()]))
                except Exception as exc:  # noqa: BLE001
                    responses.append(_error(pb, exc, unit))
            return responses

    return TritonPythonModel


class UpstreamError(InvalidRequest):
    """A BLS call that failed with INVALID_ARGUMENT upstream (e.g. the tokenizer refused a prompt)."""


#: a BLS call that failed because the server stops or a model is being reloaded (Triton's own messages; a dead stub
#: is "Stub process '<instance>' is not healthy", reloaded by serving.serve's watchdog)
UNAVAILABLE_MARKERS = ("Server not ready", "has no available versions", "is not ready", "is not healthy")


def _bls(pb, model: str, inputs: list, outputs: list[str]) -> dict[str, np.ndarray]:
    response = pb.InferenceRequest(model_name=model, requested_output_names=outputs, inputs=inputs).exec()
    if response.has_error():
        err = response.error()
        code = err.code() if hasattr(err, "code") else None
        if code is not None and code == pb.TritonError.INVALID_ARG:
            raise UpstreamError(err.message())
        if any(m in err.message() for m in UNAVAILABLE_MARKERS) or code == getattr(pb.TritonError, "UNAVAILABLE", -1):
            raise ServerUnavailable(f"{model}: {short(err.message(), 300)} (the server is stopping, or reloading a "
                                    "model whose stub died; retry)")
        raise RuntimeError(f"{model}: {err.message()}")
    return {name: pb.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}


def segment_volume_model(pb):
    class TritonPythonModel:
        def initialize(self, args):
            # torch and MONAI load now, not on the first request
            import_monai_without_transformers()
            from serving.pipelines import ContextGuard, VolumeContextClassifier, VolumeSegmenter

            config, model_dir, version_dir = _context(args)
            params = _params(config)
            manifest = read_manifest(model_dir.parent)
            manifest = dict(manifest, patch_size=[int(p) for p in params["patch_size"].split(",")])
            known = VolumeSegmenter.load_known_targets(version_dir / KNOWN_TARGETS)
            limits = ServingLimits.from_parameters(config.get("parameters", {}))
            # the pipeline checks the prompts with the tokenizer model's rules before any BLS call, so that a bad
            # prompt is INVALID_ARGUMENT (an error inside an ensemble reaches BLS without its code)
            tokenizer = PromptTokenizer(model_dir.parent / "tokenizer" / args["model_version"] / "tokenizer",
                                        manifest["model_config"]["modalities"], limits)
            # the T1 guard: the repository's context classifier over BLS, or a verdict saying there is none
            classifier = None
            if "context" in manifest and "context_classifier" in manifest.get("units", {}):
                classifier = VolumeContextClassifier(manifest, self._classify, limits)
            self.segmenter = VolumeSegmenter(manifest, known, self._encode, self._segment, limits,
                                             count_tokens=tokenizer.count_tokens,
                                             encode_instructions=self._encode_instructions,
                                             guard=ContextGuard(classifier))

        @staticmethod
        def _encode(modality: str, t1: str, targets: list[str]) -> EncodedPrompts:
            return encode_prompts_bls(pb)(modality, t1, targets)

        @staticmethod
        def _encode_instructions(modality: str, t1: str, targets: list[str], context) -> tuple[EncodedPrompts,
                                                                                                list[str]]:
            out = _bls(pb, "encode_instructions",
                       [_string_tensor(pb, "MODALITY", [modality]), _string_tensor(pb, "T1", [t1]),
                        _string_tensor(pb, "TARGETS", targets),
                        _string_tensor(pb, "CONTEXT", [json.dumps(context.to_dict(), sort_keys=True)])],
                       ["MODALITY_INDEX", "FILM", "HEAD_PARAMS", "TARGET_EMBEDDING", "INSTRUCTIONS"])
            enc = EncodedPrompts(int(out["MODALITY_INDEX"][0]), out["FILM"], out["HEAD_PARAMS"],
                                 out["TARGET_EMBEDDING"])
            return enc, decode_strings(out["INSTRUCTIONS"], "INSTRUCTIONS")

        @staticmethod
        def _segment(image, modality, film, head_params) -> np.ndarray:
            return _bls(pb, "segmenter", _image_feed(pb, image, modality, film, head_params), ["logits"])["logits"]

        @staticmethod
        def _classify(views) -> np.ndarray:
            from serving.pipelines import ClassifierNotLoaded

            try:
                return classify_views_bls(pb)(views)
            except RuntimeError as exc:   # Triton: "Request for unknown model: 'context_classifier' is not found"
                if "is not found" in str(exc):
                    raise ClassifierNotLoaded("the context classifier is not loaded on this server") from None
                raise

        def execute(self, requests):
            responses = []
            for request in requests:
                try:
                    volume, affine, modality, t1 = _volume_request(pb, request)
                    targets = decode_strings(_input(pb, request, "TARGETS"), "TARGETS")
                    pred, verdict = self.segmenter.guarded(
                        volume, affine, modality, t1, targets, strict_context=_flag(pb, request, "STRICT_CONTEXT"),
                        instructions=_one_string(pb, request, "INSTRUCTIONS", optional=True),
                        context=_one_string(pb, request, "CONTEXT", optional=True))
                    responses.append(pb.InferenceResponse([
                        pb.Tensor("LABELS", pred.labels), _string_tensor(pb, "RESOLVED_TARGETS", pred.resolved),
                        pb.Tensor("SIMILARITY", np.asarray(pred.similarity, dtype=np.float32)),
                        _string_tensor(pb, "STEM", [pred.stem]),
                        _string_tensor(pb, "CONDITIONING_TEXTS", pred.conditioned_by),
                        _string_tensor(pb, "CONTEXT_VERDICT", [json.dumps(verdict)])]))
                except Exception as exc:  # noqa: BLE001
                    responses.append(_error(pb, exc, "segment_volume"))
            return responses

    return TritonPythonModel


def prognose_model(pb):
    """Volume + MODALITY/T1 + EHR note -> RISK and the IMAGE_FEATURES it used (BLS over the prognosis units)."""

    class TritonPythonModel:
        def initialize(self, args):
            import_monai_without_transformers()
            import duplus.models.prognosis  # noqa: F401 - torch, MONAI and scipy load now, not on the first request
            import duplus.preprocessing  # noqa: F401
            from serving.pipelines import Prognoser

            config, model_dir, version_dir = _context(args)
            manifest = read_manifest(model_dir.parent)
            limits = ServingLimits.from_parameters(config.get("parameters", {}))
            prog = manifest["prognosis"]
            self.prompt_check = PromptTokenizer(model_dir.parent / "tokenizer" / args["model_version"] / "tokenizer",
                                                manifest["model_config"]["modalities"], limits)
            self.prognoser = Prognoser(
                manifest, EHRTokenizer(version_dir / "tokenizer", prog["max_ehr_tokens"], prog["max_ehr_chars"]),
                encode_prompts_bls(pb), self._features, self._encode_ehr, self._head, limits)

        @staticmethod
        def _features(image, modality, film, head_params):
            out = _bls(pb, "image_features", _image_feed(pb, image, modality, film, head_params),
                       ["probabilities", "pooled"])
            return out["probabilities"], out["pooled"]

        @staticmethod
        def _encode_ehr(input_ids, attention_mask):
            return _bls(pb, "text_encoder_ehr", [pb.Tensor("input_ids", input_ids),
                                                 pb.Tensor("attention_mask", attention_mask)], ["embedding"])["embedding"]

        @staticmethod
        def _head(image_features, ehr_embedding):
            return _bls(pb, "prognosis", [pb.Tensor("image_features", np.ascontiguousarray(image_features)),
                                          pb.Tensor("ehr_embedding", np.ascontiguousarray(ehr_embedding))],
                        ["risk"])["risk"]

        def execute(self, requests):
            responses = []
            for request in requests:
                try:
                    volume, affine, modality, t1 = _volume_request(pb, request)
                    ehr = list(np.asarray(_input(pb, request, "EHR"), dtype=object).reshape(-1))
                    self.prompt_check(modality, t1, ["primary tumour"])
                    out = self.prognoser(volume, affine, modality, t1, ehr)
                    responses.append(pb.InferenceResponse([
                        pb.Tensor("RISK", np.array([out.risk], dtype=np.float32)),
                        pb.Tensor("IMAGE_FEATURES", out.image_features.astype(np.float32)),
                        _string_tensor(pb, "FEATURE_NAMES", out.feature_names)]))
                except Exception as exc:  # noqa: BLE001
                    responses.append(_error(pb, exc, "prognose"))
            return responses

    return TritonPythonModel


def encode_prompts_bls(pb):
    """encode_prompts over BLS (shared by segment_volume and prognose)."""

    def encode(modality: str, t1: str, targets: list[str]) -> EncodedPrompts:
        out = _bls(pb, "encode_prompts",
                   [_string_tensor(pb, "MODALITY", [modality]), _string_tensor(pb, "T1", [t1]),
                    _string_tensor(pb, "TARGETS", targets)],
                   ["MODALITY_INDEX", "FILM", "HEAD_PARAMS", "TARGET_EMBEDDING"])
        return EncodedPrompts(int(out["MODALITY_INDEX"][0]), out["FILM"], out["HEAD_PARAMS"], out["TARGET_EMBEDDING"])

    return encode


def segment_petct_model(pb):
    """CT and/or PET (each optional, each with its own affine) -> LABELS on the CT's grid (the PET's without a CT),
    MODE and LABEL_NAMES (BLS over the ``pemma_segmenter`` unit)."""

    class TritonPythonModel:
        def initialize(self, args):
            import_monai_without_transformers()
            import duplus.models.pemma  # noqa: F401 - torch and MONAI load now, not on the first request
            from serving.pipelines import PetCtSegmenter

            config, model_dir, _ = _context(args)
            manifest = read_manifest(model_dir.parent)
            self.pipeline = PetCtSegmenter(manifest, self._segment, ServingLimits.from_parameters(
                config.get("parameters", {})))

        @staticmethod
        def _segment(image, mode):
            return _bls(pb, "pemma_segmenter", [pb.Tensor("image", image), pb.Tensor("mode", mode)],
                        ["logits"])["logits"]

        @staticmethod
        def _optional(request, name):
            t = pb.get_input_tensor_by_name(request, name)
            return None if t is None else t.as_numpy()

        def execute(self, requests):
            responses = []
            for request in requests:
                try:
                    out = self.pipeline(*(self._optional(request, n) for n in ("CT", "CT_AFFINE", "PET", "PET_AFFINE")))
                    responses.append(pb.InferenceResponse([
                        pb.Tensor("LABELS", out.labels), _string_tensor(pb, "MODE", [out.mode]),
                        _string_tensor(pb, "LABEL_NAMES", out.label_names)]))
                except Exception as exc:  # noqa: BLE001
                    responses.append(_error(pb, exc, "segment_petct"))
            return responses

    return TritonPythonModel


def classify_views_bls(pb):
    """context_classifier over BLS: views [1, 3, s, s] float32 -> probabilities [1, C] (shared by classify_context
    and segment_volume's T1 guard)."""

    def classify(views: np.ndarray) -> np.ndarray:
        return _bls(pb, "context_classifier", [pb.Tensor("views", np.ascontiguousarray(views, dtype=np.float32))],
                    ["probabilities"])["probabilities"]

    return classify


def classify_context_model(pb):
    """VOLUME + AFFINE [+ T1] -> PROBABILITIES [C], CLASSES [C], CONTEXT (the best class), CONTEXT_T1 (its T1 prompt)
    and VERDICT (JSON: the T1 against the image; agrees null without a T1) (BLS over ``context_classifier``)."""

    class TritonPythonModel:
        def initialize(self, args):
            import_monai_without_transformers()
            import duplus.context.views  # noqa: F401 - torch loads now, not on the first request
            from serving.pipelines import VolumeContextClassifier

            config, model_dir, _ = _context(args)
            manifest = read_manifest(model_dir.parent)
            self.pipeline = VolumeContextClassifier(manifest, classify_views_bls(pb),
                                                    ServingLimits.from_parameters(config.get("parameters", {})))

        def execute(self, requests):
            responses = []
            for request in requests:
                try:
                    out = self.pipeline(_input(pb, request, "VOLUME"), _input(pb, request, "AFFINE"),
                                        _one_string(pb, request, "T1", optional=True))
                    v = out.verdict
                    responses.append(pb.InferenceResponse([
                        pb.Tensor("PROBABILITIES", out.probabilities.astype(np.float32)),
                        _string_tensor(pb, "CLASSES", out.keys), _string_tensor(pb, "CONTEXT", [v.key]),
                        _string_tensor(pb, "CONTEXT_T1", [v.t1]),
                        _string_tensor(pb, "VERDICT", [json.dumps(v.to_dict())])]))
                except Exception as exc:  # noqa: BLE001
                    responses.append(_error(pb, exc, "classify_context"))
            return responses

    return TritonPythonModel
