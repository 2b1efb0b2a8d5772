"""DICOM series in (geometry checked, LPS -> RAS), DICOM series out (for phantoms and tests).

Geometry: a voxel (i = column, j = row, k = slice) of a series sits at, in DICOM's LPS patient
coordinates, ``IPP_0 + i * dc * r + j * dr * c + k * ds * n`` with ``r``/``c`` the row/column
direction cosines of ImageOrientationPatient, ``dr``/``dc`` PixelSpacing (between rows, between
columns), ``n = r x c`` and ``ds`` the spacing of the slices sorted along ``n``. The affine this
module returns is nibabel's RAS convention: ``diag(-1, -1, 1, 1) @ affine_LPS``, for the array
``volume[i, j, k]``.

Refused with ``DicomSeriesError`` naming the problem: no DICOM files, several series without a
choice, mixed orientation / pixel spacing / size, duplicated or missing slices, irregular slice
spacing, gantry tilt (slices not stacked along their normal), unsupported pixel data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class DicomSeriesError(ValueError):
    """A DICOM series that cannot be turned into one regular volume."""


@dataclass(frozen=True)
class DicomSeries:
    volume: np.ndarray          # float32 [i (columns), j (rows), k (slices)], rescaled (HU for CT)
    affine: np.ndarray          # RAS, nibabel convention
    datasets: tuple             # pydicom Datasets sorted along the slice normal (k order)
    series_uid: str
    modality: str

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def _read_all(folder: Path) -> list:
    import pydicom

    files = [p for p in sorted(Path(folder).rglob("*")) if p.is_file()]
    out = []
    for p in files:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=False)
        except Exception:  # noqa: BLE001 - not DICOM (README, .DS_Store, ...)
            log.debug("skipping %s: not a DICOM file", p)
            continue
        if "PixelData" in ds and "ImagePositionPatient" in ds:
            out.append(ds)
    return out


def read_series(folder: str | Path, series_uid: str | None = None, *, spacing_tolerance: float = 0.01,
                tilt_tolerance: float = 1e-3) -> DicomSeries:
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomSeriesError(f"{folder} is not a folder")
    datasets = _read_all(folder)
    if not datasets:
        raise DicomSeriesError(f"no DICOM image with ImagePositionPatient in {folder}")
    by_series: dict[str, list] = {}
    for ds in datasets:
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    if series_uid is None:
        if len(by_series) > 1:
            desc = ", ".join(f"{uid} ({len(v)} images, {v[0].get('Modality', '?')} "
                             f"{v[0].get('SeriesDescription', '')!r})" for uid, v in by_series.items())
            raise DicomSeriesError(f"{folder} holds {len(by_series)} series (mixed series); choose one: {desc}")
        series_uid = next(iter(by_series))
    if series_uid not in by_series:
        raise DicomSeriesError(f"series {series_uid} is not in {folder}")
    slices = by_series[series_uid]

    def same(attr, cast=lambda v: tuple(float(x) for x in v)):
        values = {cast(ds[attr].value) if attr in ds else None for ds in slices}
        if None in values:
            raise DicomSeriesError(f"series {series_uid}: {attr} is missing on some images")
        if len(values) > 1:
            raise DicomSeriesError(f"series {series_uid}: {attr} differs between images ({sorted(values)[:3]} ...)")
        return next(iter(values))

    iop = np.array(same("ImageOrientationPatient", lambda v: tuple(round(float(x), 5) for x in v)))
    dr, dc = same("PixelSpacing", lambda v: tuple(round(float(x), 6) for x in v))
    rows, cols = int(same("Rows", int)), int(same("Columns", int))
    r, c = iop[:3], iop[3:]
    if abs(np.linalg.norm(r) - 1) > 1e-3 or abs(np.linalg.norm(c) - 1) > 1e-3 or abs(r @ c) > 1e-3:
        raise DicomSeriesError(f"series {series_uid}: ImageOrientationPatient {iop.tolist()} is not orthonormal")
    n = np.cross(r, c)
    positions = np.array([[float(x) for x in ds.ImagePositionPatient] for ds in slices])
    order = np.argsort(positions @ n)
    slices = [slices[i] for i in order]
    positions = positions[order]
    if len(slices) > 1:
        steps = np.diff(positions, axis=0)
        along = steps @ n
        if (along < 1e-6).any():
            raise DicomSeriesError(f"series {series_uid}: duplicated slice positions along the normal")
        ds_ = float(np.median(along))
        across = np.linalg.norm(steps - np.outer(along, n), axis=1)
        if (across > tilt_tolerance * max(1.0, ds_) + 1e-4).any():
            raise DicomSeriesError(f"series {series_uid}: slices are not stacked along their normal (gantry tilt or "
                                   f"sheared stack: {across.max():.3f} mm off-axis per slice); resample it first")
        if (np.abs(along - ds_) > spacing_tolerance * ds_ + 1e-3).any():
            gaps = int(np.sum(along > 1.5 * ds_))
            what = f"{gaps} missing slice(s)" if gaps else "irregular slice spacing"
            raise DicomSeriesError(f"series {series_uid}: {what} (spacing {np.round(along, 3).tolist()[:8]} mm ...)")
    else:
        ds_ = float(slices[0].get("SliceThickness", 1.0) or 1.0)
    volume = np.empty((cols, rows, len(slices)), dtype=np.float32)
    for k, ds in enumerate(slices):
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - compressed syntax without a decoder, broken pixel data
            raise DicomSeriesError(f"series {series_uid}: cannot decode pixel data of {ds.get('SOPInstanceUID')}: "
                                   f"{exc}") from None
        if pixels.shape != (rows, cols):
            raise DicomSeriesError(f"series {series_uid}: image of shape {pixels.shape} is not {rows}x{cols} "
                                   "(multi-frame or colour images are not supported)")
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        volume[:, :, k] = (pixels.astype(np.float32) * slope + intercept).T
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = r * dc, c * dr, n * ds_
    lps[:3, 3] = positions[0]
    return DicomSeries(volume, LPS_TO_RAS @ lps, tuple(slices), series_uid, str(slices[0].get("Modality", "")))


def normal_ordered(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image with its slice axis along ``row x column`` (how a DICOM stack is ordered).

    DICOM has no left-handed stacks: when array axis 2 points against the normal, the array is
    reversed along it and the affine adjusted, so every voxel keeps its world position.
    """
    volume = np.asarray(volume)
    affine = np.asarray(affine, dtype=np.float64)
    lps = np.linalg.inv(LPS_TO_RAS) @ affine
    if np.cross(lps[:3, 0], lps[:3, 1]) @ lps[:3, 2] >= 0:
        return volume, affine
    flipped = affine.copy()
    flipped[:3, 3] = affine[:3, 3] + affine[:3, 2] * (volume.shape[2] - 1)
    flipped[:3, 2] = -affine[:3, 2]
    return volume[:, :, ::-1], flipped


def write_series(volume: np.ndarray, affine: np.ndarray, folder: str | Path, *, modality: str = "CT",
                 body_part: str = "ABDOMEN", series_description: str = "", patient_id: str = "PHANTOM",
                 study_uid: str | None = None, series_uid: str | None = None) -> list[Path]:
    """A volume + RAS affine as a single-frame DICOM series (CT or MR Image Storage), 16-bit signed.

    Slices go along array axis 2; ``read_series`` gives back ``normal_ordered(volume, affine)``:
    exactly this array and affine, or both reversed along the slice axis (same world positions).
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    volume, affine = normal_ordered(np.asarray(volume, dtype=np.float32), affine)
    lps = np.linalg.inv(LPS_TO_RAS) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    r, c, n = (lps[:3, a] / spacing[a] for a in range(3))
    if abs(np.cross(r, c) @ n - 1) > 1e-4:
        raise ValueError("the affine's axes are not orthogonal: a DICOM series cannot represent it")
    sop_class = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}.get(modality)
    if sop_class is None:
        raise ValueError(f"write_series writes CT or MR, not {modality!r}")
    slope = 1.0
    lo, hi = float(volume.min()), float(volume.max())
    intercept = -1024.0 if modality == "CT" else 0.0
    if hi - intercept > 32767 or lo - intercept < -32768:
        slope = max(hi - intercept, intercept - lo) / 32767
    study_uid, series_uid = study_uid or generate_uid(), series_uid or generate_uid()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    frame_uid = generate_uid()
    paths = []
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"slice_{k:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_id, "Phantom^Duplus", "", "O"
        ds.StudyDate = ds.SeriesDate = "20261122"
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.Modality, ds.BodyPartExamined, ds.SeriesDescription = modality, body_part, series_description
        ds.Manufacturer = "duplus-stack phantom"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [f"{v:.6f}" for v in lps[:3, 3] + lps[:3, 2] * k]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*r, *c)]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]   # between rows, between columns
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = f"{intercept:g}", f"{slope:.10g}"
        if modality == "CT":
            ds.RescaleType, ds.KVP = "HU", "120"
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "3D"
            ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "500", "10", "1"
        stored = np.round((volume[:, :, k].T - intercept) / slope).astype(np.int16)
        ds.PixelData = stored.tobytes()
        path = folder / f"slice_{k:04d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths
