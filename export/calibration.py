"""int8 calibration data for the TensorRT image units (``--precision int8``), and its cache.

TensorRT's entropy calibrator (``export.tensorrt_engine``) asks for batches at the calibration profile's opt
shapes. For the image units (segmenter, image_features) they are what the served units see:

- ``phantom_cases``: procedural phantoms (``duplus.synth.phantoms.generate_phantom``) of each region/modality
  the model has a stem for, preprocessed to model space exactly as served (``duplus.preprocessing.to_model_space``:
  RAS, model spacing, normalised intensities), each with the FiLM and head parameters of its real prompts
  (the region's T1 and its structures as targets, through the unit's own text encoder and conditioning);
- ``calibration_batches``: random patches of one case per batch at the opt shapes (edge-padded where a
  volume is smaller), its stem index, FiLM per sample and head parameters for K targets;
- ``CalibrationStream``: the batches in the order of the input names TensorRT asks for, made lazily (no
  phantom is drawn when the cache holds the table), each shape checked;
- ``CalibrationCache``: the calibration table in one file, valid for one key only (the ONNX file's sha256 and
  the calibration data), so a changed unit calibrates again instead of reusing stale scales.

Nothing here needs TensorRT; the tests check it on any machine.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: the inputs of an image unit, in contract order
IMAGE_INPUTS = ("image", "modality", "film", "head_params")

Batch = dict[str, np.ndarray]
#: (T1 prompt, target prompts) -> (film [F], head_params [K, P]) through the unit's own encoder and conditioning
Condition = Callable[[str, list[str]], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True, eq=False)
class CalibrationCase:
    """One preprocessed volume and the conditioning of its prompts."""

    image: np.ndarray          # [X, Y, Z] float32, model space (RAS, model spacing, normalised)
    modality: int              # stem index
    film: np.ndarray           # [F] float32
    head_params: np.ndarray    # [K, P] float32, one row per target prompt

    def __post_init__(self) -> None:
        if np.ndim(self.image) != 3:
            raise ValueError(f"calibration image must be [X, Y, Z], got shape {np.shape(self.image)}")
        if np.ndim(self.film) != 1 or np.ndim(self.head_params) != 2 or len(self.head_params) < 1:
            raise ValueError(f"calibration conditioning must be film [F] and head_params [K, P], got "
                             f"{np.shape(self.film)} and {np.shape(self.head_params)}")


def phantom_cases(cfg, condition: Condition, contexts: Sequence[tuple[str, str]] | None = None, *, n_cases: int = 6,
                  seed: int = 0, targets: Sequence[str] | None = None, t1: str | None = None,
                  acquisition=None) -> list[CalibrationCase]:
    """``n_cases`` phantoms cycling over ``contexts`` ((region, modality) pairs; default: every pair the phantoms
    support and ``cfg.modalities`` has a stem for), in model space with their prompts' conditioning.

    ``targets`` / ``t1``: the prompts (default: the phantom's structures, and the region's canonical T1);
    ``acquisition``: a fixed ``AcquisitionSpec`` instead of a random one per seed (tests use a coarse one).
    """
    from duplus.preprocessing import to_model_space
    from duplus.synth.phantoms import REGION_MODALITIES, generate_phantom
    from duplus.vocabulary import canonical_t1

    if contexts is None:
        contexts = [(r, m) for r, mods in REGION_MODALITIES.items() for m in mods if m in cfg.modalities]
    contexts = list(contexts)
    if not contexts or n_cases < 1:
        raise ValueError(f"no calibration cases: {n_cases} cases over contexts {contexts}")
    cases = []
    for i in range(n_cases):
        region, modality = contexts[i % len(contexts)]
        ph = generate_phantom(region, modality, seed + i, acquisition=acquisition)
        x, _ = to_model_space(ph.image, ph.affine, modality, tuple(cfg.spacing))
        prompts = list(targets or ph.label_names)
        film, head = condition(t1 or canonical_t1(modality, region, ph.sequence), prompts)
        image = np.asarray(x.as_tensor()[0] if hasattr(x, "as_tensor") else x[0], dtype=np.float32)
        cases.append(CalibrationCase(image, cfg.modalities.index(modality), np.asarray(film, np.float32).reshape(-1),
                                     np.asarray(head, np.float32)))
        log.info("calibration case %d: %s %s, model-space grid %s, %d targets", i, modality, region, image.shape,
                 len(prompts))
    return cases


def random_patch(image: np.ndarray, size: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """A ``size`` patch at a random position of ``image`` (edge-padded first along axes that are shorter)."""
    size = tuple(int(s) for s in size)
    pads = [(0, max(0, s - n)) for n, s in zip(image.shape, size)]
    if any(p for _, p in pads):
        image = np.pad(image, pads, mode="edge")
    start = [int(rng.integers(0, n - s + 1)) for n, s in zip(image.shape, size)]
    return np.ascontiguousarray(image[tuple(slice(a, a + s) for a, s in zip(start, size))])


def calibration_batches(cases: Sequence[CalibrationCase], shapes: dict[str, tuple[int, ...]], *, n_batches: int,
                        seed: int = 0) -> list[Batch]:
    """``n_batches`` feeds of an image unit at exactly ``shapes`` (the calibration profile's opt shapes).

    Batch j takes case ``j % len(cases)``: ``b`` random patches of its volume, its stem index and FiLM for each
    sample, and its head parameters cycled to ``k`` rows; dtypes as the contract (float32, stem int64).
    """
    missing = [n for n in IMAGE_INPUTS if n not in shapes]
    if missing or not cases or n_batches < 1:
        raise ValueError(f"calibration needs shapes for {IMAGE_INPUTS} (missing {missing}), cases and batches")
    image_shape = tuple(shapes["image"])
    if len(image_shape) != 5 or image_shape[1] != 1:
        raise ValueError(f"calibration image shape must be [b, 1, x, y, z], got {image_shape}")
    b, patch = image_shape[0], image_shape[2:]
    (k, p), (fb, f) = shapes["head_params"], shapes["film"]
    if tuple(shapes["modality"]) != (b,) or fb != b:
        raise ValueError(f"calibration shapes disagree on the batch size {b}: {shapes}")
    rng = np.random.default_rng(seed)
    out = []
    for j in range(n_batches):
        case = cases[j % len(cases)]
        if case.film.shape != (f,) or case.head_params.shape[1] != p:
            raise ValueError(f"calibration case {j % len(cases)}: film {case.film.shape} / head_params "
                             f"{case.head_params.shape} do not fit film [{f}] / head_params [k, {p}]")
        out.append({
            "image": np.stack([random_patch(case.image, patch, rng) for _ in range(b)])[:, None].astype(np.float32),
            "modality": np.full((b,), case.modality, dtype=np.int64),
            "film": np.repeat(case.film[None], b, axis=0).astype(np.float32),
            "head_params": np.ascontiguousarray(case.head_params[np.arange(k) % len(case.head_params)],
                                                dtype=np.float32)})
    return out


@dataclass(frozen=True)
class PhantomCalibration:
    """The calibration data of one image unit: which phantoms and prompts, how many batches. ``key`` names
    the data for the cache; ``batches(shapes)`` draws it (seconds per phantom, only on a cache miss)."""

    cfg: object                                    # DuPLUSConfig: modalities and spacing
    condition: Condition = field(repr=False)
    contexts: tuple[tuple[str, str], ...] | None = None
    targets: tuple[str, ...] | None = None
    t1: str | None = None
    n_cases: int = 6
    n_batches: int = 24
    seed: int = 0
    acquisition: object = None                     # AcquisitionSpec: a fixed one (tests), else random per seed

    def key(self, shapes: dict[str, tuple[int, ...]]) -> str:
        return (f"phantoms contexts={self.contexts} targets={self.targets} t1={self.t1} cases={self.n_cases} "
                f"batches={self.n_batches} seed={self.seed} acquisition={self.acquisition} "
                f"spacing={tuple(self.cfg.spacing)} shapes={sorted(shapes.items())}")

    def batches(self, shapes: dict[str, tuple[int, ...]]) -> list[Batch]:
        cases = phantom_cases(self.cfg, self.condition, self.contexts, n_cases=self.n_cases, seed=self.seed,
                              targets=self.targets, t1=self.t1, acquisition=self.acquisition)
        return calibration_batches(cases, shapes, n_batches=self.n_batches, seed=self.seed)


class CalibrationStream:
    """The batches TensorRT's calibrator hands over one by one, arrays in the order of the names it asks for.

    ``make`` is called on the first ``next`` only: with a valid cache TensorRT never asks, and no phantom is drawn.
    """

    def __init__(self, make: Callable[[], list[Batch]], shapes: dict[str, tuple[int, ...]]):
        self.make = make
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        self.batches: list[Batch] | None = None
        self.index = 0

    def next(self, names: Sequence[str]) -> list[np.ndarray] | None:
        """The next batch's arrays for ``names``, or None when every batch was handed over."""
        if self.batches is None:
            self.batches = list(self.make())
            if not self.batches:
                raise ValueError("no calibration batches")
            log.info("int8 calibration on %d batches of %s", len(self.batches), self.shapes)
        if self.index >= len(self.batches):
            return None
        feed, i = self.batches[self.index], self.index
        self.index += 1
        out = []
        for name in names:
            if name not in feed:
                raise ValueError(f"calibration batch {i} has no input {name!r} (it has {sorted(feed)})")
            a = np.ascontiguousarray(feed[name])
            if name in self.shapes and a.shape != self.shapes[name]:
                raise ValueError(f"calibration batch {i}: {name} has shape {a.shape}, the calibration profile's opt "
                                 f"shape is {self.shapes[name]}")
            out.append(a)
        return out


class CalibrationCache:
    """TensorRT's calibration table in one file, valid only for ``key``.

    The file is a header line (magic and the key's sha256) followed by the table; ``read`` gives None (calibrate
    again) for a missing file, another key or an empty table; ``write`` replaces the file atomically.
    """

    MAGIC = b"duplus-int8-calibration "

    def __init__(self, path: Path, key: str):
        self.path = Path(path)
        self.key = key
        self.header = self.MAGIC + hashlib.sha256(key.encode()).hexdigest().encode() + b"\n"

    def read(self) -> bytes | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        if not raw.startswith(self.header) or len(raw) == len(self.header):
            log.info("calibration cache %s is for other data: calibrating again", self.path)
            return None
        log.info("calibration table from %s", self.path)
        return raw[len(self.header):]

    def write(self, table: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(self.header + bytes(table))
        os.replace(tmp, self.path)
        log.info("wrote calibration table %s (%d bytes)", self.path, len(table))
