"""The tensor contract of the exported units and the serving limits (torch-free, so serving processes import
it cheaply).

Each deployable part is one exported unit with named inputs/outputs, dtypes and dynamic axes. ``contracts`` and
``prognosis_contracts`` are the single source of truth: the ONNX export, the parity check, the engine builders,
the Triton configurations and the request checks of the served units all read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the model's config, read for its sizes only
    from duplus.models.duplus import DuPLUSConfig

#: files of a built model repository
MANIFEST = "manifest.json"
KNOWN_TARGETS = "known_targets.npz"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                     # numpy dtype name: float32, int64, uint8
    shape: tuple[int | str, ...]   # ints are fixed, strings name dynamic axes

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16", "int64", "int32", "uint8", "bool"):
            raise ValueError(f"TensorSpec {self.name}: unsupported dtype {self.dtype!r}")
        object.__setattr__(self, "shape", tuple(self.shape))

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: s for i, s in enumerate(self.shape) if isinstance(s, str)}


@dataclass(frozen=True)
class UnitContract:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str = ""

    @classmethod
    def from_manifest(cls, name: str, entry: dict) -> UnitContract:
        """The contract as ``build_engines`` recorded it in manifest.json."""
        def specs(rows):
            return tuple(TensorSpec(n, d, tuple(s)) for n, d, s in rows)

        return cls(name, specs(entry["inputs"]), specs(entry["outputs"]))


@dataclass(frozen=True)
class ServingLimits:
    """What segment_volume accepts and how it runs the sliding window."""

    max_voxels: int = 512 * 512 * 640          # input grid
    max_model_voxels: int = 400 * 400 * 400    # after resampling to the model spacing
    max_targets: int = 16
    max_prompt_chars: int = 256
    max_prompt_tokens: int = 64
    overlap: float = 0.25
    sw_batch_size: int = 2
    target_similarity: float = 0.6
    ambiguity_margin: float = 0.05

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


def contracts(cfg: DuPLUSConfig) -> dict[str, UnitContract]:
    e = cfg.text_dim
    return {
        "text_encoder": UnitContract(
            "text_encoder",
            (TensorSpec("input_ids", "int64", ("n", "tokens")), TensorSpec("attention_mask", "int64", ("n", "tokens"))),
            (TensorSpec("embedding", "float32", ("n", e)),),
            "frozen sentence encoder, mean-pooled and L2-normalised"),
        "conditioning": UnitContract(
            "conditioning",
            (TensorSpec("t1_embedding", "float32", ("b", e)), TensorSpec("t2_embedding", "float32", ("k", e))),
            (TensorSpec("film", "float32", ("b", cfg.film_size)),
             TensorSpec("head_params", "float32", ("k", cfg.head_params))),
            "T1 -> FiLM gamma/beta of every stage; T2 -> dynamic-head parameters (controller)"),
        "segmenter": UnitContract(
            "segmenter",
            (TensorSpec("image", "float32", ("b", 1, "x", "y", "z")), TensorSpec("modality", "int64", ("b",)),
             TensorSpec("film", "float32", ("b", cfg.film_size)),
             TensorSpec("head_params", "float32", ("k", cfg.head_params))),
            (TensorSpec("logits", "float32", ("b", "k", "x", "y", "z")),
             TensorSpec("probabilities", "float32", ("b", "k", "x", "y", "z"))),
            "modality stems + FiLM U-Net + K dynamic heads, one backbone pass for K targets; logits for "
            "Gaussian blending in the sliding window, their sigmoid for single-patch clients"),
    }


def prognosis_contracts(cfg: DuPLUSConfig, image_dim: int, text_dim: int) -> dict[str, UnitContract]:
    """The three prognosis units; ``image_dim`` = radiomics + 3 x the decoder's head-input channels."""
    c3 = image_dim
    return {
        "image_features": UnitContract(
            "image_features",
            (TensorSpec("image", "float32", ("b", 1, "x", "y", "z")), TensorSpec("modality", "int64", ("b",)),
             TensorSpec("film", "float32", ("b", cfg.film_size)),
             TensorSpec("head_params", "float32", ("k", cfg.head_params))),
            (TensorSpec("probabilities", "float32", ("b", "k", "x", "y", "z")),
             TensorSpec("pooled", "float32", ("b", "pooled"))),
            "frozen segmenter: per-target probabilities and the decoder features pooled over each target "
            f"(probability-weighted) and globally; with K=2 (tumour, node) pooled has {c3 - 5} values"),
        "text_encoder_ehr": UnitContract(
            "text_encoder_ehr",
            (TensorSpec("input_ids", "int64", ("n", "tokens")), TensorSpec("attention_mask", "int64", ("n", "tokens"))),
            (TensorSpec("embedding", "float32", ("n", text_dim)),),
            "the sentence encoder with the prognosis LoRA adapters merged in (EHR notes)"),
        "prognosis": UnitContract(
            "prognosis",
            (TensorSpec("image_features", "float32", ("n", image_dim)),
             TensorSpec("ehr_embedding", "float32", ("n", text_dim))),
            (TensorSpec("risk", "float32", ("n",)),),
            "late-fusion Cox head: log-risk from standardised image features and the EHR embedding"),
    }
