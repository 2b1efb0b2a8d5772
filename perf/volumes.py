"""The benchmark volumes: one table of seeded phantoms, their prompts, and the patch cut from them.

Every tool under ``perf/`` draws its input from here, so a name means the same voxels everywhere:
``python -m perf.bench --volumes``, ``python -m perf.load --volumes`` (the locust cases) and the
perf_analyzer input data. The seeds are held out of training (the demo's held-out cases).

* ``ct_256``: an abdomen CT acquired at 1.5 mm and centred in a 256x256x160 air field of view,
  the size of a whole clinical CT;
* ``ct_abdomen``, ``ct_head_neck``, ``pet_head_neck``: phantoms at their seed's own acquisition;
* ``small_ct_head_neck``: a head-and-neck CT at 3 mm, small enough for short load tests;
* ``ct_512``: an abdomen CT at 0.78 x 0.78 x 1.5 mm (423x291x128, the body at a 512x512 scan's resolution);
* ``ct_512x300``: the same abdomen at 0.78 x 0.78 x 0.7 mm in a 512x512x300 field of view (air around the body),
  a thin-slice clinical CT: the GPU end-to-end figure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cache

import numpy as np

#: region -> the targets every tool prompts for on a volume of that region
TARGETS = {"abdomen": ["liver", "spleen", "left kidney", "right kidney"], "head_neck": ["primary tumour", "lymph node"]}
#: the segmenter's patch in the side-by-side benchmark (the perf_analyzer input data uses 96x96x64)
PATCH = (96, 96, 96)


@dataclass(frozen=True)
class BenchVolume:
    """One named phantom: its seed, and optionally a fixed acquisition spacing and a padded field of view."""

    region: str
    modality: str
    seed: int
    spacing: tuple[float, float, float] | None = None   # None: the seed's own random acquisition
    fov: tuple[int, int, int] | None = None              # pad with air (CT) to this shape, centred

    @property
    def targets(self) -> list[str]:
        return list(TARGETS[self.region])


VOLUMES = {
    "ct_256": BenchVolume("abdomen", "CT", 515151, spacing=(1.5, 1.5, 1.5), fov=(256, 256, 160)),
    "ct_abdomen": BenchVolume("abdomen", "CT", 424242),
    "ct_head_neck": BenchVolume("head_neck", "CT", 444444),
    "pet_head_neck": BenchVolume("head_neck", "PET", 444444),
    "small_ct_head_neck": BenchVolume("head_neck", "CT", 454545, spacing=(3.0, 3.0, 3.0)),
    "ct_512": BenchVolume("abdomen", "CT", 515151, spacing=(0.78, 0.78, 1.5)),
    "ct_512x300": BenchVolume("abdomen", "CT", 515151, spacing=(0.78, 0.78, 0.7), fov=(512, 512, 300)),
}


def _volume(name: str) -> BenchVolume:
    try:
        return VOLUMES[name]
    except KeyError:
        raise ValueError(f"unknown volume {name!r}; choose from {sorted(VOLUMES)}") from None


def make_volume(name: str):
    """The :class:`duplus.synth.phantoms.Phantom` of one benchmark volume (image, label, affine, ...)."""
    from duplus.synth.phantoms import AcquisitionSpec, generate_phantom

    v = _volume(name)
    acq = AcquisitionSpec(spacing=v.spacing, axis_order=(0, 1, 2), flips=(True, True, False), noise=1.0) \
        if v.spacing else None
    ph = generate_phantom(v.region, v.modality, v.seed, acquisition=acq)
    if v.fov is None:
        return ph
    fov = np.array(v.fov)
    shape = np.array(ph.image.shape)
    if (shape > fov).any():
        raise ValueError(f"{name}: phantom {tuple(shape)} does not fit {tuple(fov)}")
    lo = (fov - shape) // 2
    image = np.full(fov, -1000.0, dtype=np.float32)   # air around the body, as in a real CT
    label = np.zeros(fov, dtype=ph.label.dtype)
    sl = tuple(slice(a, a + n) for a, n in zip(lo, shape))
    image[sl], label[sl] = ph.image, ph.label
    affine = ph.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ lo
    return dataclasses.replace(ph, image=image, label=label, affine=affine)


def t1_prompt(name: str, sequence: str | None = None) -> str:
    """The plain context prompt of a volume, e.g. 'CT of the abdomen'."""
    from duplus.vocabulary import canonical_t1

    v = _volume(name)
    return canonical_t1(v.modality, v.region, sequence)


def phantom_patch(name: str = "ct_abdomen", size: tuple[int, int, int] = (96, 96, 64),
                  around: str = "liver") -> np.ndarray:
    """A [1, 1, *size] float32 model-space patch of a benchmark volume centred on one structure (never random bytes).

    Where the volume is smaller than ``size`` the rest is the volume's lowest value (air).
    """
    return _phantom_patch(name, tuple(size), around).copy()


@cache
def _phantom_patch(name: str, size: tuple[int, int, int], around: str) -> np.ndarray:
    from duplus.preprocessing import to_model_space

    ph = make_volume(name)
    x, y = to_model_space(ph.image, ph.affine, ph.modality, label=ph.label)
    x, y = np.asarray(x[0]), np.asarray(y[0])
    centre = np.argwhere(y == ph.label_names.index(around) + 1).mean(0).astype(int)
    size_ = np.array(size)
    start = np.clip(centre - size_ // 2, 0, np.maximum(np.array(x.shape) - size_, 0))
    patch = np.zeros(size_, dtype=np.float32) + x.min()
    crop = x[tuple(slice(s, s + n) for s, n in zip(start, size_))]
    patch[tuple(slice(0, n) for n in crop.shape)] = crop
    return patch[None, None]
