"""Renderings for the context classifier: views of phantoms of every context, in fixed, seed-disjoint splits.

Splits (fixed before any model was trained; the seeds never overlap):

* ``pretrain``  the vision-language alignment corpus, the stand-in for BiomedCLIP's figure-caption corpus: all
  eight contexts, 200 cases each, cleaner images (noise 0.3-1.0), each with a caption drawn at random per step
  (:func:`caption_pool`, training.train_context.align) that is often partial, as figure captions are: 40 %
  name modality and region, 30 % the modality only, 30 % the region only, and an MR caption names its sequence
  (T1-/T2-weighted) only one time in four ('MRI of the abdomen');
* ``pool``      the downstream training pool, "clinical" volumes unlike the corpus's: all eight contexts, 48
  cases each, noisier (0.5-3.0) and cropped to a partial field of view (each axis 50-100 % of the region, at a
  random offset, as a liver MR or a neck CT covers part of the body); few-shot runs draw their K shots from it;
* ``val``       12 clinical cases per context: hyper-parameters (steps, learning rate, lambda) are chosen on it;
* ``test``      the held-out set: 25 clinical cases per context. Every figure in the README is on it;
* ``ci``        2 clinical cases per context that the test suite renders (never trained or chosen on);
* ``pretrain_clinical``  the shipped classifier's alignment corpus: as ``pretrain`` (captions included), but of
  clinical images, so that the backbone a hospital's guard runs on has seen noisy, partial volumes (the few-shot
  study keeps the ``pretrain`` backbone, whose gap to the clinical splits is what prompt tuning is measured on).

A case is :func:`duplus.synth.phantoms.generate_phantom` on a coarse random grid (2.5-5 mm, random axis order
and flips), which is fast (~0.1 s) and enough: the classifier views the volume at 4 mm. The corpus and the
clinical splits differ (noise, field of view) as a figure corpus and a hospital's archive do: that gap is
what prompt tuning has to close.
"""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from duplus.context.classes import CONTEXT_KEYS, parse_key
from duplus.vocabulary import MODALITY_PHRASES, REGION_PHRASES, T1_TEMPLATES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    name: str
    keys: tuple[str, ...]
    per_class: int
    seed0: int
    noise: tuple[float, float]
    crop: tuple[float, float] | None = None     # kept share of each axis (partial field of view), None: whole


CLINICAL_NOISE, CLINICAL_CROP = (0.5, 3.0), (0.5, 1.0)
SPLITS: dict[str, Split] = {
    "pretrain": Split("pretrain", CONTEXT_KEYS, 200, 1_000_000, (0.3, 1.0)),
    "pool": Split("pool", CONTEXT_KEYS, 48, 2_000_000, CLINICAL_NOISE, CLINICAL_CROP),
    "val": Split("val", CONTEXT_KEYS, 12, 3_000_000, CLINICAL_NOISE, CLINICAL_CROP),
    "test": Split("test", CONTEXT_KEYS, 25, 4_000_000, CLINICAL_NOISE, CLINICAL_CROP),
    "ci": Split("ci", CONTEXT_KEYS, 2, 5_000_000, CLINICAL_NOISE, CLINICAL_CROP),   # the test suite's cases
    # the shipped classifier's corpus: the same contexts and captions, clinical images (noisy, partial views)
    "pretrain_clinical": Split("pretrain_clinical", CONTEXT_KEYS, 200, 6_000_000, CLINICAL_NOISE, CLINICAL_CROP),
}


def case_seed(split: Split, key: str, index: int) -> int:
    return split.seed0 + 10_000 * CONTEXT_KEYS.index(key) + index


def render_case(key: str, seed: int, noise: tuple[float, float],
                crop: tuple[float, float] | None = None) -> np.ndarray:
    """One phantom of context ``key`` (cropped to a partial field of view when ``crop``) -> its [3, 64, 64] views."""
    from duplus.context.views import context_views
    from duplus.synth.phantoms import AcquisitionSpec, generate_phantom

    c = parse_key(key)
    rng = np.random.default_rng([seed, 0xC0])
    acq = AcquisitionSpec(spacing=tuple(float(v) for v in rng.uniform(2.5, 5.0, 3)),
                          axis_order=tuple(int(v) for v in rng.permutation(3)),
                          flips=tuple(bool(v) for v in rng.random(3) < 0.5),
                          noise=float(rng.uniform(*noise)), sequence=c.sequence)
    p = generate_phantom(c.region, c.modality, seed, acquisition=acq, any_modality=True)
    image, affine = p.image, p.affine
    if crop is not None:
        shape = np.asarray(image.shape)
        keep = np.maximum(8, np.round(shape * rng.uniform(*crop, 3))).astype(int).clip(max=shape)
        lo = np.array([rng.integers(0, s - k + 1) for s, k in zip(shape, keep)])
        image = image[tuple(slice(a, a + k) for a, k in zip(lo, keep))]
        affine = affine.copy()
        affine[:3, 3] += affine[:3, :3] @ lo
    return context_views(image, affine, check=False).numpy()


def _render(args):
    return render_case(*args)


def load_split(name: str, cache: Path | str = "runs/context/views", workers: int = 2) -> dict:
    """{'views': [N, 3, 64, 64], 'labels': [N] indices into CONTEXT_KEYS, 'seeds': [N]}, cached as .pt."""
    from tqdm.auto import tqdm

    split = SPLITS[name]
    path = Path(cache) / f"{name}.pt"
    if path.exists():
        return torch.load(path)
    jobs = [(k, case_seed(split, k, i), split.noise, split.crop) for k in split.keys for i in range(split.per_class)]
    log.info("rendering %d %s cases", len(jobs), name)
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            views = list(tqdm(ex.map(_render, jobs, chunksize=8), total=len(jobs), desc=f"render {name}"))
    else:
        views = [_render(j) for j in tqdm(jobs, desc=f"render {name}")]
    out = {"views": torch.from_numpy(np.stack(views)),
           "labels": torch.tensor([CONTEXT_KEYS.index(job[0]) for job in jobs]),
           "seeds": torch.tensor([job[1] for job in jobs])}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


@dataclass(frozen=True)
class Caption:
    text: str
    modality: str | None     # 'CT', 'MR', 'PET' or None (not named)
    sequence: str | None     # 'T1' / 'T2' or None (not named)
    region: str | None

    def describes(self, key: str) -> bool:
        c = parse_key(key)
        return ((self.modality is None or self.modality == c.modality)
                and (self.sequence is None or self.sequence == c.sequence)
                and (self.region is None or self.region == c.region))


_PARTIAL_MODALITY = ("{m}", "a {m}", "an image from {m}", "{m} image")
_PARTIAL_REGION = ("a scan of {r}", "an image of {r}", "a medical image of {r}", "imaging of {r}")


def caption_pool(keys=CONTEXT_KEYS) -> list[Caption]:
    """Every caption the alignment corpus may give an image of the ``keys`` contexts: full T1 phrasings of the
    vocabulary, modality-only and region-only ones."""
    out: dict[str, Caption] = {}
    regions = sorted({parse_key(k).region for k in keys})
    mods = sorted({parse_key(k).modality_key for k in keys} | ({"MR"} if any("MR" in k for k in keys) else set()))
    for mk in mods:
        modality, _, seq = mk.partition(":")
        for phrase in MODALITY_PHRASES[mk]:
            for t in _PARTIAL_MODALITY:
                out.setdefault(t.format(m=phrase), Caption(t.format(m=phrase), modality, seq or None, None))
            for region in regions:
                if not any(Caption("", modality, seq or None, region).describes(k) for k in keys):
                    continue
                for rp in REGION_PHRASES[region]:
                    for t in T1_TEMPLATES:
                        s = t.format(modality=phrase, region=rp)
                        out.setdefault(s, Caption(s, modality, seq or None, region))
    for region in regions:
        for rp in REGION_PHRASES[region]:
            for t in _PARTIAL_REGION:
                out.setdefault(t.format(r=rp), Caption(t.format(r=rp), None, None, region))
    return list(out.values())
