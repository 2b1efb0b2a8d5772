"""Preprocessing shared by training and inference, and its inverse.

Forward (input grid -> model space): orientation to RAS, resampling to the model spacing
(1.5 mm by default), per-modality intensity normalisation. All of it with MONAI transforms
on MetaTensors, so the affine travels with the data.

Inverse (model space -> input grid): resample per-target probabilities onto the input's own
shape and affine (trilinear), then fuse to labels there, so that masks come back in the
geometry the image came in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import NormalizeIntensity, Orientation, ScaleIntensityRange, Spacing, SpatialResample

from duplus.checks import check_volume  # noqa: F401 - the volume rules live with the request rules

log = logging.getLogger(__name__)

# world axis labels of RAS+ (nibabel/NIfTI): x runs left -> right, y posterior -> anterior, z inferior -> superior
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True)
class IntensityPolicy:
    """How one modality's intensities are mapped to the network's range."""

    kind: str  # "window" (fixed range, e.g. HU or SUV) or "zscore" (per image, inside the body)
    low: float = 0.0
    high: float = 1.0
    out_low: float = 0.0
    out_high: float = 1.0
    clip: tuple[float, float] = (-5.0, 5.0)

    def __post_init__(self) -> None:
        if self.kind not in ("window", "zscore"):
            raise ValueError(f"IntensityPolicy.kind must be 'window' or 'zscore', got {self.kind!r}")
        if self.kind == "window" and not self.high > self.low:
            raise ValueError(f"IntensityPolicy window needs high > low, got low={self.low}, high={self.high}")


INTENSITY_POLICIES: dict[str, IntensityPolicy] = {
    # soft-tissue CT window in Hounsfield units, -250..350 HU -> -1..1 (bone and air saturate)
    "CT": IntensityPolicy("window", low=-250.0, high=350.0, out_low=-1.0, out_high=1.0, clip=(-1.5, 3.0)),
    # MR has no absolute scale: z-score over the body (non-zero) voxels
    "MR": IntensityPolicy("zscore", clip=(-4.0, 6.0)),
    # PET in SUV: 0..10 SUV -> 0..2, hot lesions keep their contrast up to the clip
    "PET": IntensityPolicy("window", low=0.0, high=10.0, out_low=0.0, out_high=2.0, clip=(0.0, 5.0)),
}


def normalise_intensity(image: torch.Tensor, modality: str) -> torch.Tensor:
    if modality not in INTENSITY_POLICIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {tuple(INTENSITY_POLICIES)}")
    policy = INTENSITY_POLICIES[modality]
    if policy.kind == "window":
        out = ScaleIntensityRange(policy.low, policy.high, policy.out_low, policy.out_high, clip=False)(image)
    else:
        body = image > (image.mean() * 0.1 if image.numel() else 0)
        out = NormalizeIntensity(subtrahend=float(image[body].mean()) if body.any() else 0.0,
                                 divisor=float(image[body].std()) + 1e-6 if body.any() else 1.0)(image)
    return torch.clamp(out, *policy.clip)


def to_model_space(image: np.ndarray | torch.Tensor, affine: np.ndarray, modality: str,
                   spacing: tuple[float, float, float] = (1.5, 1.5, 1.5), *,
                   label: np.ndarray | torch.Tensor | None = None, check: bool = True,
                   device: str | torch.device | None = None) -> tuple[MetaTensor, MetaTensor | None]:
    """Input grid -> RAS, model spacing, normalised intensities. Returns [1, X, Y, Z] MetaTensors (the image on
    ``device``, where the resampling runs: a GPU resamples a 512x512x300 CT many times faster than the host)."""
    if check:
        check_volume(np.asarray(image), affine)
    affine_t = torch.as_tensor(np.asarray(affine, dtype=np.float64))
    img = MetaTensor(torch.as_tensor(np.asarray(image, dtype=np.float32), device=device)[None], affine=affine_t)
    img = Orientation(axcodes="RAS", labels=RAS_LABELS)(img)
    img = Spacing(pixdim=spacing, mode="bilinear", padding_mode="border")(img)
    img = MetaTensor(normalise_intensity(img, modality), meta=img.meta)
    lab = None
    if label is not None:
        lab = MetaTensor(torch.as_tensor(np.asarray(label, dtype=np.float32))[None], affine=affine_t)
        lab = Orientation(axcodes="RAS", labels=RAS_LABELS)(lab)
        lab = Spacing(pixdim=spacing, mode="nearest", padding_mode="zeros")(lab)
        if lab.shape != img.shape:
            raise RuntimeError(f"label resampled to {tuple(lab.shape)} but image to {tuple(img.shape)}")
    return img, lab


#: CT body outline: tissue denser than this (fat is about -100 HU, lung and air far below it); the body's box in
#: model space is where the segmenter runs, everything outside it is background (organs and lesions are in the body)
BODY_HU = -300.0
#: a slice of the box holds at least this many body voxels (a speck of noise in the air does not widen the box)
BODY_MIN_VOXELS = 16
#: the box grows by this many model-space voxels on every side (the Gaussian window's context at the skin)
BODY_MARGIN = 8


def body_box(x: torch.Tensor, modality: str, *, min_voxels: int = BODY_MIN_VOXELS,
             margin: int = BODY_MARGIN) -> tuple[slice, slice, slice] | None:
    """The box around the patient's body in a normalised model-space CT ``x`` [1, X, Y, Z] (or [X, Y, Z]), as
    slices, or None where there is nothing to crop: not a CT (MR and PET have no absolute air level), no body
    found, or a body that fills the field of view.  A CT's field of view is mostly air around the body (a whole
    abdomen at 512x512 in-plane); the segmenter never saw air-only windows and must not be asked about them."""
    if modality != "CT":
        return None
    policy = INTENSITY_POLICIES["CT"]
    level = policy.out_low + (BODY_HU - policy.low) / (policy.high - policy.low) * (policy.out_high - policy.out_low)
    body = torch.as_tensor(x).reshape(x.shape[-3:]) > level
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        counts = body.sum(dim=others)
        idx = torch.nonzero(counts >= min_voxels).flatten()
        if idx.numel() == 0:
            return None
        n = body.shape[axis]
        box.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, n)))
    if all(b.start == 0 and b.stop == n for b, n in zip(box, body.shape)):
        return None
    return tuple(box)


def _affine64(affine) -> torch.Tensor:
    """A 4x4 affine as a float64 CPU tensor, from numpy or a tensor on any device (a MetaTensor's, resampled on a
    GPU)."""
    if isinstance(affine, torch.Tensor):
        affine = affine.detach().cpu().numpy()
    return torch.as_tensor(np.asarray(affine, dtype=np.float64))


def to_input_grid(values: torch.Tensor, model_affine: np.ndarray | torch.Tensor, input_affine: np.ndarray,
                  input_shape: tuple[int, int, int], mode: str = "bilinear") -> torch.Tensor:
    """Model-space [C, X, Y, Z] -> the input's own grid [C, I, J, K] (same shape and affine as the input)."""
    plain = values.as_tensor() if isinstance(values, MetaTensor) else values
    src = MetaTensor(plain.float(), affine=_affine64(model_affine))
    out = SpatialResample(mode=mode, padding_mode="border" if mode != "nearest" else "zeros", dtype=torch.float32)(
        src, dst_affine=torch.as_tensor(np.asarray(input_affine, dtype=np.float64)), spatial_size=tuple(input_shape))
    out = out.as_tensor() if isinstance(out, MetaTensor) else out
    if tuple(out.shape[1:]) != tuple(input_shape):
        raise RuntimeError(f"inverse resampling produced {tuple(out.shape[1:])}, expected {tuple(input_shape)}")
    return out


def fuse_labels(probabilities: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """[K, ...] per-target probabilities -> uint8 labels 1..K (0 where no target reaches the threshold)."""
    best, index = probabilities.max(dim=0)
    return torch.where(best >= threshold, index + 1, torch.zeros_like(index)).to(torch.uint8)


def keep_largest_components(labels: np.ndarray, resolved, single: frozenset[str] | None = None) -> np.ndarray:
    """Post-processing: for every target that is one connected structure (``SINGLE_STRUCTURE_TARGETS``: liver,
    spleen, kidneys, aorta, pancreas, stomach), keep the largest 6-connected component of its label and set the
    others to background, as nnU-Net's post-processing does.  Tumours and lymph nodes (several lesions) are left
    as they are.  ``labels``: uint8 1..K for the K prompts, ``resolved``: the canonical target of each prompt.
    (MONAI's KeepLargestConnectedComponent needs scikit-image or cuCIM, neither a dependency here; scipy is.)
    """
    from scipy import ndimage

    from duplus.vocabulary import SINGLE_STRUCTURE_TARGETS

    single = SINGLE_STRUCTURE_TARGETS if single is None else single
    labels = np.array(labels, copy=True)
    boxes = ndimage.find_objects(labels)          # one bounding box per label value 1..max
    for k, name in enumerate(resolved):
        value = k + 1
        if name not in single or value > len(boxes) or boxes[value - 1] is None:
            continue
        box = boxes[value - 1]
        mask = labels[box] == value
        components, n = ndimage.label(mask)       # default structure: face (6-) connectivity
        if n > 1:
            sizes = np.bincount(components.ravel())[1:]
            view = labels[box]
            view[mask & (components != int(np.argmax(sizes)) + 1)] = 0
    return labels


def world_bounds(shape, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World (RAS mm) lower and upper corners of the box spanned by a grid's voxel centres."""
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    world = corners @ np.asarray(affine, dtype=np.float64).T
    return world[:, :3].min(axis=0), world[:, :3].max(axis=0)


#: two scans must share at least this much (mm along every world axis) to be fused
MIN_OVERLAP_MM = 10.0


def petct_to_model_space(ct: np.ndarray | None, ct_affine: np.ndarray | None, pet: np.ndarray | None,
                         pet_affine: np.ndarray | None, spacing: tuple[float, float, float] = (2.0, 2.0, 2.0), *,
                         label: np.ndarray | None = None, check: bool = True
                         ) -> tuple[torch.Tensor, tuple[bool, bool], np.ndarray, tuple[int, int, int],
                                    torch.Tensor | None]:
    """CT and/or PET of one patient -> one RAS grid at ``spacing``, the CT's frame (the PET's without a CT).

    Returns ``(image [2, X, Y, Z], (has_ct, has_pet), model_affine, reference_shape, label)``: channel 0
    the normalised CT, channel 1 the normalised PET resampled onto the CT's model grid (zeros for a
    missing modality), the model grid's affine, the shape of the grid labels go back to (the CT's, or the
    PET's without a CT), and the label (on that reference grid) resampled like the image.  Raises
    ``ValueError`` when neither image is given or the two do not overlap in world space.
    """
    has_ct, has_pet = ct is not None, pet is not None
    if not (has_ct or has_pet):
        raise ValueError("neither a CT nor a PET image was given")
    if has_ct and has_pet:
        (ct_lo, ct_hi), (pet_lo, pet_hi) = world_bounds(ct.shape, ct_affine), world_bounds(pet.shape, pet_affine)
        overlap = np.minimum(ct_hi, pet_hi) - np.maximum(ct_lo, pet_lo)
        if (overlap < MIN_OVERLAP_MM).any():
            raise ValueError(
                "the CT and the PET do not overlap in world space (they must share the frame of reference): "
                f"CT spans {np.round(ct_lo, 1).tolist()}..{np.round(ct_hi, 1).tolist()} mm, "
                f"PET {np.round(pet_lo, 1).tolist()}..{np.round(pet_hi, 1).tolist()} mm")
    ref_image, ref_affine, ref_modality = (ct, ct_affine, "CT") if has_ct else (pet, pet_affine, "PET")
    ref, lab = to_model_space(ref_image, ref_affine, ref_modality, spacing, label=label, check=check)
    model_affine = np.asarray(ref.affine, dtype=np.float64)
    channels = [ref.as_tensor()[0], torch.zeros_like(ref.as_tensor()[0])] if has_ct else \
        [torch.zeros_like(ref.as_tensor()[0]), ref.as_tensor()[0]]
    if has_ct and has_pet:
        if check:
            check_volume(np.asarray(pet), pet_affine)
        # resample the PET (SUV) straight onto the CT's model grid, then normalise
        src = MetaTensor(torch.as_tensor(np.asarray(pet, dtype=np.float32))[None],
                         affine=torch.as_tensor(np.asarray(pet_affine, dtype=np.float64)))
        on_ct = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)(
            src, dst_affine=torch.as_tensor(model_affine), spatial_size=tuple(ref.shape[1:]))
        channels[1] = normalise_intensity(on_ct.as_tensor() if isinstance(on_ct, MetaTensor) else on_ct, "PET")[0]
    image = torch.stack(channels)
    return image, (has_ct, has_pet), model_affine, tuple(int(v) for v in ref_image.shape), \
        (lab.as_tensor()[0] if lab is not None else None)
