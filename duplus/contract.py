"""The tensor contract of the exported units and the serving limits (torch-free, so serving processes import
it cheaply).

Each deployable part is one exported unit with named inputs/outputs, dtypes and dynamic axes. ``contracts`` and
``prognosis_contracts`` are the single source of truth: the ONNX export, the parity check, the engine builders,
the Triton configurations and the request checks of the served units all read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from duplus.vocabulary import AMBIGUITY_MARGIN, MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS, TARGET_SIMILARITY

if TYPE_CHECKING:  # read for sizes and types only
    import numpy as np

    from duplus.models.duplus import DuPLUSConfig

#: files of a built model repository
MANIFEST = "manifest.json"
KNOWN_TARGETS = "known_targets.npz"


class InvalidRequest(ValueError):
    """A request the pipeline refuses, naming the problem (INVALID_ARGUMENT when served)."""


def level_factor(channels) -> int:
    """2 ** (number of downsamplings) of a U-Net with these stage widths: every spatial size the segmenter
    takes must be a multiple of it."""
    return 2 ** (len(channels) - 1)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                     # numpy dtype name: float32, int64, uint8
    shape: tuple[int | str, ...]   # ints are fixed, strings name dynamic axes (one name, one size per request)
    bounds: tuple[int, int] | None = None   # integer inputs: allowed values lo <= v < hi (indices, token ids)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16", "int64", "int32", "uint8", "bool"):
            raise ValueError(f"TensorSpec {self.name}: unsupported dtype {self.dtype!r}")
        object.__setattr__(self, "shape", tuple(self.shape))
        if self.bounds is not None:
            lo, hi = (int(b) for b in self.bounds)
            if hi <= lo:
                raise ValueError(f"TensorSpec {self.name}: bounds {self.bounds} are empty")
            object.__setattr__(self, "bounds", (lo, hi))

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: s for i, s in enumerate(self.shape) if isinstance(s, str)}

    def to_row(self) -> list:
        row = [self.name, self.dtype, list(self.shape)]
        return row + [list(self.bounds)] if self.bounds is not None else row


@dataclass(frozen=True)
class UnitContract:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str = ""
    multiple_of: tuple[tuple[str, int], ...] = ()   # dynamic axes whose size must be a multiple (U-Net levels)
    max_sizes: tuple[tuple[str, int], ...] = ()     # dynamic axes with a largest size (position table, batch caps)

    def to_manifest(self) -> dict:
        """What ``build_engines`` records in manifest.json (read back by ``from_manifest``)."""
        entry = {"inputs": [t.to_row() for t in self.inputs], "outputs": [t.to_row() for t in self.outputs]}
        if self.multiple_of:
            entry["multiple_of"] = {axis: m for axis, m in self.multiple_of}
        if self.max_sizes:
            entry["max_sizes"] = {axis: m for axis, m in self.max_sizes}
        return entry

    @classmethod
    def from_manifest(cls, name: str, entry: dict) -> UnitContract:
        """The contract as ``build_engines`` recorded it in manifest.json."""
        def specs(rows):
            return tuple(TensorSpec(r[0], r[1], tuple(r[2]), tuple(r[3]) if len(r) > 3 else None) for r in rows)

        return cls(name, specs(entry["inputs"]), specs(entry["outputs"]),
                   multiple_of=tuple((str(a), int(m)) for a, m in entry.get("multiple_of", {}).items()),
                   max_sizes=tuple((str(a), int(m)) for a, m in entry.get("max_sizes", {}).items()))


@dataclass(frozen=True)
class EncodedPrompts:
    """What the prompts of one request become (the ``encode_prompts`` ensemble's outputs; numpy arrays)."""

    modality_index: int           # the stem: the modality the T1 names, else the declared one
    film: np.ndarray              # [1, F]
    head_params: np.ndarray       # [K, P]
    target_embedding: np.ndarray  # [K, E]


@dataclass(frozen=True)
class ServingLimits:
    """What segment_volume accepts and how it runs the sliding window."""

    max_voxels: int = 512 * 512 * 640          # input grid
    max_model_voxels: int = 400 * 400 * 400    # after resampling to the model spacing
    max_targets: int = 16
    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_prompt_tokens: int = MAX_PROMPT_TOKENS
    overlap: float = 0.25
    sw_batch_size: int = 2
    target_similarity: float = TARGET_SIMILARITY
    ambiguity_margin: float = AMBIGUITY_MARGIN

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        for name in ("max_voxels", "max_model_voxels", "max_targets", "max_prompt_chars", "max_prompt_tokens",
                     "sw_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def parameters(self) -> tuple[tuple[str, str], ...]:
        return tuple((k, str(getattr(self, k))) for k in self.__dataclass_fields__)

    @classmethod
    def from_parameters(cls, params: dict) -> ServingLimits:
        kw = {}
        for k, f in cls.__dataclass_fields__.items():
            if k in params:
                raw = params[k]["string_value"] if isinstance(params[k], dict) else params[k]
                kw[k] = (float if f.type == "float" else int)(raw)
        return cls(**kw)


#: the position table of the BERT-family sentence encoders (MiniLM, PubMedBERT): a longer token sequence fails
#: inside the graph
MAX_TEXT_TOKENS = 512
#: the most rows (texts, targets, windows) one direct unit request may carry; served pipelines send far fewer
#: (at most ServingLimits.max_targets targets, sw_batch_size windows)
MAX_UNIT_BATCH = 64
TEXT_LIMITS = (("n", MAX_UNIT_BATCH), ("tokens", MAX_TEXT_TOKENS))
IMAGE_LIMITS = (("b", MAX_UNIT_BATCH), ("k", MAX_UNIT_BATCH))


def _token_inputs(vocab_size: int | None) -> tuple[TensorSpec, ...]:
    """The inputs of a text encoder unit: token ids (bounded by the vocabulary where known) and their mask."""
    return (TensorSpec("input_ids", "int64", ("n", "tokens"), (0, vocab_size) if vocab_size else None),
            TensorSpec("attention_mask", "int64", ("n", "tokens"), (0, 2)))


def _image_inputs(cfg: DuPLUSConfig) -> tuple[TensorSpec, ...]:
    """The inputs of a unit that runs the segmenter on model-space images (segmenter, image_features)."""
    return (TensorSpec("image", "float32", ("b", 1, "x", "y", "z")),
            TensorSpec("modality", "int64", ("b",), (0, len(cfg.modalities))),
            TensorSpec("film", "float32", ("b", cfg.film_size)),
            TensorSpec("head_params", "float32", ("k", cfg.head_params)))


def contracts(cfg: DuPLUSConfig, vocab_size: int | None = None) -> dict[str, UnitContract]:
    """The DuPLUS units; ``vocab_size`` (the tokenizer's) bounds the token ids where known."""
    e = cfg.text_dim
    spatial = tuple((a, level_factor(cfg.channels)) for a in ("x", "y", "z"))
    return {
        "text_encoder": UnitContract(
            "text_encoder", _token_inputs(vocab_size),
            (TensorSpec("embedding", "float32", ("n", e)),),
            "frozen sentence encoder, mean-pooled and L2-normalised", max_sizes=TEXT_LIMITS),
        "conditioning": UnitContract(
            "conditioning",
            (TensorSpec("t1_embedding", "float32", ("b", e)), TensorSpec("t2_embedding", "float32", ("k", e))),
            (TensorSpec("film", "float32", ("b", cfg.film_size)),
             TensorSpec("head_params", "float32", ("k", cfg.head_params))),
            "T1 -> FiLM gamma/beta of every stage; T2 -> dynamic-head parameters (controller)", max_sizes=IMAGE_LIMITS),
        "segmenter": UnitContract(
            "segmenter",
            _image_inputs(cfg),
            (TensorSpec("logits", "float32", ("b", "k", "x", "y", "z")),
             TensorSpec("probabilities", "float32", ("b", "k", "x", "y", "z"))),
            "modality stems + FiLM U-Net + K dynamic heads, one backbone pass for K targets; logits for "
            "Gaussian blending in the sliding window, their sigmoid for single-patch clients", spatial, IMAGE_LIMITS),
    }


def prognosis_contracts(cfg: DuPLUSConfig, image_dim: int, text_dim: int, vocab_size: int | None = None
                        ) -> dict[str, UnitContract]:
    """The three prognosis units; ``image_dim`` = radiomics + 3 x the decoder's head-input channels."""
    c3 = image_dim
    spatial = tuple((a, level_factor(cfg.channels)) for a in ("x", "y", "z"))
    return {
        "image_features": UnitContract(
            "image_features",
            _image_inputs(cfg),
            (TensorSpec("probabilities", "float32", ("b", "k", "x", "y", "z")),
             TensorSpec("pooled", "float32", ("b", "pooled"))),
            "frozen segmenter: per-target probabilities and the decoder features pooled over each target "
            f"(probability-weighted) and globally; with K=2 (tumour, node) pooled has {c3 - 5} values", spatial,
            IMAGE_LIMITS),
        "text_encoder_ehr": UnitContract(
            "text_encoder_ehr", _token_inputs(vocab_size),
            (TensorSpec("embedding", "float32", ("n", text_dim)),),
            "the sentence encoder with the prognosis LoRA adapters merged in (EHR notes)", max_sizes=TEXT_LIMITS),
        "prognosis": UnitContract(
            "prognosis",
            (TensorSpec("image_features", "float32", ("n", image_dim)),
             TensorSpec("ehr_embedding", "float32", ("n", text_dim))),
            (TensorSpec("risk", "float32", ("n",)),),
            "late-fusion Cox head: log-risk from standardised image features and the EHR embedding",
            max_sizes=(("n", MAX_UNIT_BATCH),)),
    }


#: the label values of ``segment_petct`` and the PEMMA model's output channels (HECKTOR's: 1 GTVp, 2 GTVn)
PETCT_LABELS = ("background", "primary tumour", "lymph node")
#: the PEMMA model's input modes, in the order of the unit's ``mode`` index
PETCT_MODES = ("ct+pet", "ct", "pet")


def pemma_contracts(crop: int) -> dict[str, UnitContract]:
    """The PEMMA unit: UNETR's position table fixes the window at ``crop``³ (a multiple of its 16³ patches)."""
    return {
        "pemma_segmenter": UnitContract(
            "pemma_segmenter",
            (TensorSpec("image", "float32", ("b", 2, crop, crop, crop)),
             TensorSpec("mode", "int64", (1,), (0, len(PETCT_MODES)))),
            (TensorSpec("logits", "float32", ("b", len(PETCT_LABELS), crop, crop, crop)),
             TensorSpec("probabilities", "float32", ("b", len(PETCT_LABELS), crop, crop, crop))),
            "PEMMA UNETR, adapters merged: CT and PET windows (zeros where absent) and the input mode "
            f"({', '.join(f'{i} {m}' for i, m in enumerate(PETCT_MODES))}) -> logits and softmax of "
            f"{', '.join(PETCT_LABELS)}", max_sizes=(("b", MAX_UNIT_BATCH),)),
    }


#: the context classifier's input channels: three orthogonal views (axial, coronal, sagittal) of a volume
#: (``duplus.context.views.context_views``), intensities scaled to [0, 1] per volume
CONTEXT_VIEWS = 3


def context_contracts(keys, size: int) -> dict[str, UnitContract]:
    """The context classifier (Biomed-DPT, issue 21): views [b, 3, size, size] -> probabilities over ``keys``
    (the prompt-tuned text features of the classes are constants of the graph)."""
    keys = tuple(keys)
    return {
        "context_classifier": UnitContract(
            "context_classifier",
            (TensorSpec("views", "float32", ("b", CONTEXT_VIEWS, size, size)),),
            (TensorSpec("probabilities", "float32", ("b", len(keys))),),
            f"prompt-tuned ViT: axial, coronal and sagittal views of a volume -> softmax over the {len(keys)} "
            f"contexts ({', '.join(keys)})", max_sizes=(("b", MAX_UNIT_BATCH),)),
    }
