"""Modality physics: tissue maps to CT (HU), MR (T1/T2 weighted) and PET (SUV) images."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from duplus.synth.phantoms.acquisition import AcquisitionSpec, ScannerProfile
from duplus.synth.phantoms.anatomy import _N_TISSUES, _T, Anatomy, _Canvas
from duplus.synth.phantoms.geometry import _WorldField

_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def _tables(values: dict[_T, tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    missing = [t.name for t in _T if t not in values]
    if missing:  # a programming error, not a user error
        raise AssertionError(f"tissue table lacks {missing}")
    mean = np.array([values[t][0] for t in _T], np.float32)
    texture = np.array([values[t][1] for t in _T], np.float32)
    return mean, texture


def _render_ct(canvas: _Canvas, anatomy: Anatomy, acq: AcquisitionSpec, rng: np.random.Generator,
               scanner: ScannerProfile | None = None) -> np.ndarray:
    """Contrast-enhanced CT in HU (portal-venous phase, the standard abdominal protocol): tissue values,
    texture, slight blur, Gaussian noise.  ``scanner`` may make the lesions nearly isodense (the
    non-contrast CT of a PET/CT) and set the reconstruction kernel."""
    u = rng.uniform
    liver, aorta, cortex = u(95.0, 115.0), u(160.0, 220.0), u(150.0, 190.0)
    T = _T
    mean, tex = _tables(
        {
            T.AIR: (-1000.0, 0.0),
            T.LUNG: (u(-870.0, -830.0), 25.0),
            T.FAT: (u(-110.0, -90.0), 8.0),
            T.VISCERAL_FAT: (u(-105.0, -85.0), 10.0),
            T.MUSCLE: (u(40.0, 50.0), 5.0),
            T.BOWEL: (u(25.0, 45.0), 12.0),
            T.BOWEL_GAS: (-950.0, 40.0),
            T.CORTICAL_BONE: (u(750.0, 900.0), 60.0),
            T.CANCELLOUS_BONE: (u(380.0, 480.0), 40.0),
            T.DISC: (u(80.0, 100.0), 8.0),
            T.CSF: (u(5.0, 15.0), 3.0),
            T.CORD: (u(30.0, 40.0), 4.0),
            T.LIVER: (liver, 6.0),
            T.HEPATIC_VESSEL: (aorta * u(0.6, 0.75), 8.0),
            T.SPLEEN: (liver - u(12.0, 18.0), 5.0),
            T.KIDNEY_CORTEX: (cortex, 10.0),
            T.KIDNEY_MEDULLA: (cortex - u(30.0, 50.0), 10.0),
            T.AORTA: (aorta, 8.0),
            T.IVC: (aorta * u(0.55, 0.75), 8.0),
            T.PANCREAS: (u(70.0, 82.0), 7.0),
            T.STOMACH_WALL: (u(45.0, 58.0), 5.0),
            T.STOMACH_FLUID: (u(5.0, 15.0), 4.0),
            T.STOMACH_GAS: (-1000.0, 0.0),
            T.GALLBLADDER: (u(5.0, 15.0), 3.0),
            T.ARTERY: (u(180.0, 250.0), 8.0),
            T.VEIN: (u(130.0, 180.0), 8.0),
            T.TUMOUR: (u(80.0, 95.0), 10.0),
            T.NODE: (u(65.0, 75.0), 6.0),
            T.NECROSIS: (u(25.0, 35.0), 5.0),
            T.THYROID: (u(95.0, 130.0), 8.0),
            T.SUBMANDIBULAR: (u(40.0, 55.0), 5.0),
            T.PAROTID: (u(-5.0, 20.0), 8.0),
            T.AIRWAY: (-1000.0, 0.0),
            T.MUCOSA: (u(45.0, 60.0), 5.0),
        }
    )
    sigma = u(10.0, 25.0) * acq.noise
    blur = 0.6  # voxels: the default sharp kernel
    if scanner is not None:  # extra draws come after the default ones: no profile, same image as before
        if scanner.ct_lesion_hu is not None:
            muscle = mean[T.MUSCLE]
            mean[T.TUMOUR] = muscle + u(*scanner.ct_lesion_hu)
            mean[T.NODE] = muscle + u(*scanner.ct_lesion_hu) * 0.8
            mean[T.NECROSIS] = muscle - u(5.0, 15.0)
        if scanner.ct_kernel_fwhm_mm is not None:
            blur = [max(0.3, scanner.ct_kernel_fwhm_mm * _FWHM_TO_SIGMA / s) for s in acq.spacing]
    texture = anatomy.texture.sample(canvas.grid, canvas.grid.full())
    image = mean[canvas.tissue]
    image += tex[canvas.tissue] * texture
    del texture
    image = ndimage.gaussian_filter(image, sigma=blur, truncate=3.0)
    if sigma > 0:
        image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
    # scanners store integer HU; it also lets the gzipped NIfTI shrink by about half
    return np.round(image, out=image)


def _render_mr(canvas: _Canvas, anatomy: Anatomy, acq: AcquisitionSpec, rng: np.random.Generator,
               scanner: ScannerProfile | None = None) -> np.ndarray:
    """T1- or T2-weighted magnitude image: relative intensities, bias field, Rician noise."""
    u = rng.uniform
    T = _T
    t1 = acq.sequence == "T1"
    bright_blood = t1 and rng.random() < 0.5  # T1 after gadolinium, else flow void
    blood = u(650.0, 850.0) if bright_blood else u(20.0, 60.0)
    table = {  # (T1, T2) relative signal, relative texture amplitude
        T.AIR: (0.0, 0.0),
        T.LUNG: (15.0, 25.0),
        T.FAT: (950.0, 700.0),
        T.VISCERAL_FAT: (900.0, 650.0),
        T.MUSCLE: (320.0, 170.0),
        T.BOWEL: (350.0, 450.0),
        T.BOWEL_GAS: (5.0, 5.0),
        T.CORTICAL_BONE: (25.0, 20.0),
        T.CANCELLOUS_BONE: (600.0, 420.0),
        T.DISC: (250.0, 600.0),
        T.CSF: (150.0, 1000.0),
        T.CORD: (380.0, 400.0),
        T.LIVER: (520.0, 220.0),
        T.HEPATIC_VESSEL: (blood * 0.9, 60.0),
        T.SPLEEN: (380.0, 560.0),
        T.KIDNEY_CORTEX: (480.0, 620.0),
        T.KIDNEY_MEDULLA: (300.0, 780.0),
        T.AORTA: (blood, 40.0),
        T.IVC: (blood * 0.85, 60.0),
        T.PANCREAS: (560.0, 300.0),
        T.STOMACH_WALL: (360.0, 280.0),
        T.STOMACH_FLUID: (100.0, 1000.0),
        T.STOMACH_GAS: (5.0, 5.0),
        T.GALLBLADDER: (120.0, 1050.0),
        T.ARTERY: (blood, 40.0),
        T.VEIN: (blood * 0.85, 60.0),
        T.TUMOUR: (350.0, 600.0),
        T.NODE: (330.0, 550.0),
        T.NECROSIS: (150.0, 900.0),
        T.THYROID: (450.0, 500.0),
        T.SUBMANDIBULAR: (420.0, 450.0),
        T.PAROTID: (600.0, 500.0),
        T.AIRWAY: (0.0, 0.0),
        T.MUCOSA: (330.0, 300.0),
    }
    scale = u(0.5, 2.0)  # arbitrary scanner units
    jitter = rng.uniform(0.92, 1.08, _N_TISSUES)
    mean, _ = _tables({t: (v[0 if t1 else 1], 0.0) for t, v in table.items()})
    mean = (mean * jitter * scale).astype(np.float32)
    texture = anatomy.texture.sample(canvas.grid, canvas.grid.full())
    image = mean[canvas.tissue]
    image *= 1.0 + np.float32(0.04) * texture
    del texture
    image = ndimage.gaussian_filter(image, sigma=0.6, truncate=3.0)
    bias_field = _WorldField.random(rng, anatomy.lo, anatomy.hi, step=u(120.0, 180.0))
    bias = bias_field.sample(canvas.grid, canvas.grid.full())
    image *= np.clip(np.exp(np.float32(u(0.06, 0.12)) * bias), 0.7, 1.3)
    del bias
    sigma = np.float32(u(0.015, 0.035) * 500.0 * scale * acq.noise)
    if sigma > 0:  # magnitude of a complex signal with Gaussian noise in both channels (Rician)
        real = image + rng.standard_normal(image.shape, dtype=np.float32) * sigma
        imag = rng.standard_normal(image.shape, dtype=np.float32) * sigma
        image = np.sqrt(real * real + imag * imag)
    return np.maximum(image, np.float32(1e-3))


def _render_pet(canvas: _Canvas, anatomy: Anatomy, acq: AcquisitionSpec, rng: np.random.Generator,
                scanner: ScannerProfile | None = None) -> np.ndarray:
    """SUV map: tissue uptake, lesion profiles, partial-volume blur, signal-dependent noise.  ``scanner``
    may set the system resolution and a cross-calibration factor."""
    u = rng.uniform
    T = _T
    soft = u(0.8, 1.2)
    mean, tex = _tables(
        {
            T.AIR: (0.0, 0.0),
            T.LUNG: (0.4, 0.03),
            T.FAT: (0.3, 0.03),
            T.VISCERAL_FAT: (0.35, 0.03),
            T.MUSCLE: (soft, 0.06),
            T.BOWEL: (u(1.2, 2.0), 0.2),
            T.BOWEL_GAS: (0.0, 0.0),
            T.CORTICAL_BONE: (0.5, 0.04),
            T.CANCELLOUS_BONE: (u(0.6, 0.9), 0.05),
            T.DISC: (0.6, 0.04),
            T.CSF: (0.3, 0.02),
            T.CORD: (u(0.9, 1.2), 0.05),
            T.LIVER: (u(1.8, 2.6), 0.1),
            T.HEPATIC_VESSEL: (1.8, 0.05),
            T.SPLEEN: (u(1.5, 2.2), 0.08),
            T.KIDNEY_CORTEX: (u(2.0, 3.5), 0.1),
            T.KIDNEY_MEDULLA: (u(2.5, 4.5), 0.1),
            T.AORTA: (u(1.5, 2.0), 0.05),
            T.IVC: (u(1.4, 1.9), 0.05),
            T.PANCREAS: (u(1.2, 1.7), 0.06),
            T.STOMACH_WALL: (u(1.5, 2.5), 0.1),
            T.STOMACH_FLUID: (0.5, 0.03),
            T.STOMACH_GAS: (0.0, 0.0),
            T.GALLBLADDER: (0.3, 0.02),
            T.ARTERY: (u(1.5, 2.0), 0.05),
            T.VEIN: (u(1.4, 1.9), 0.05),
            T.TUMOUR: (6.0, 0.6),
            T.NODE: (4.0, 0.3),
            T.NECROSIS: (u(0.6, 1.0), 0.05),
            T.THYROID: (u(1.2, 2.0), 0.08),
            T.SUBMANDIBULAR: (u(2.0, 3.0), 0.15),
            T.PAROTID: (u(2.0, 3.0), 0.15),
            T.AIRWAY: (0.0, 0.0),
            T.MUCOSA: (u(1.2, 2.0), 0.1),
        }
    )
    texture = anatomy.texture.sample(canvas.grid, canvas.grid.full())
    image = mean[canvas.tissue]
    if canvas.uptake is not None:  # tumour and nodes: radial profile, hotter centre
        hot = canvas.uptake > 0
        image[hot] = canvas.uptake[hot]
    image += tex[canvas.tissue] * texture
    del texture
    fwhm = u(4.0, 6.0)
    if scanner is not None and scanner.pet_fwhm_mm is not None:
        fwhm = scanner.pet_fwhm_mm
    sigma_vox = [fwhm * _FWHM_TO_SIGMA / s for s in acq.spacing]
    image = ndimage.gaussian_filter(image, sigma=sigma_vox, truncate=3.0)
    np.maximum(image, 0.0, out=image)
    gain = np.float32(u(0.01, 0.03) * acq.noise)  # noise variance per unit SUV
    if gain > 0:
        image += np.sqrt(image * gain) * rng.standard_normal(image.shape, dtype=np.float32)
    if scanner is not None and scanner.pet_calibration != 1.0:
        image *= np.float32(scanner.pet_calibration)
    return np.maximum(image, 0.0)


_RENDERERS = {"CT": _render_ct, "MR": _render_mr, "PET": _render_pet}
