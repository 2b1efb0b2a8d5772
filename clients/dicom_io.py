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


PET_UNITS = (None, "SUV")     # read_series(pet_units=...): None = SUV from the header, "SUV" = already SUVbw


@dataclass(frozen=True)
class DicomSeries:
    volume: np.ndarray          # float32 [i (columns), j (rows), k (slices)], rescaled (HU for CT, SUVbw for PET)
    affine: np.ndarray          # RAS, nibabel convention
    datasets: tuple             # pydicom Datasets sorted along the slice normal (k order)
    series_uid: str
    modality: str
    units: str = ""             # "HU" (CT), "SUVbw" (PT), "" (as rescaled: MR and others)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def read_images(folder: str | Path) -> list:
    """Every DICOM image (pixel data and a position) under ``folder``, read once (``read_series(datasets=...)``)."""
    return _read_all(Path(folder))


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


def pair_petct(folder: str | Path) -> tuple[str, str]:
    """(CT series UID, PET series UID) of the one CT and one PET series in ``folder`` that share a Frame of
    Reference (one PET/CT acquisition: their world coordinates agree).  Refused, naming the series found, when
    there is no such pair or more than one."""
    import pydicom

    folder = Path(folder)
    if not folder.is_dir():
        raise DicomSeriesError(f"{folder} is not a folder")
    series: dict[str, tuple[str, str, str]] = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True,
                                 specific_tags=["SeriesInstanceUID", "Modality", "FrameOfReferenceUID",
                                                "StudyInstanceUID"])
        except Exception:  # noqa: BLE001 - not DICOM
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if uid and ds.get("Modality") in ("CT", "PT"):
            series.setdefault(uid, (str(ds.Modality), str(ds.get("FrameOfReferenceUID", "")),
                                    str(ds.get("StudyInstanceUID", ""))))
    pairs = [(ct, pt) for ct, (m1, f1, s1) in series.items() if m1 == "CT"
             for pt, (m2, f2, s2) in series.items() if m2 == "PT" and f1 and f1 == f2 and s1 == s2]
    if len(pairs) == 1:
        return pairs[0]
    found = ", ".join(f"{uid} ({m}, frame of reference {f or 'missing'})" for uid, (m, f, _) in series.items())
    if not pairs:
        raise DicomSeriesError(f"{folder} holds no CT and PET series of one study sharing a Frame of Reference "
                               f"(found: {found or 'no CT or PET series'})")
    raise DicomSeriesError(f"{folder} holds {len(pairs)} CT/PET pairs sharing a Frame of Reference; give the "
                           f"series with --ct and --pet (found: {found})")


def read_series(folder: str | Path, series_uid: str | None = None, *, spacing_tolerance: float = 0.01,
                tilt_tolerance: float = 1e-3, pet_units: str | None = None, datasets: list | None = None
                ) -> DicomSeries:
    """The one regular volume of a series, in RAS; PET in body-weight SUV.

    ``pet_units``: None = compute SUVbw from the PET header (``suv_factors``; refused naming the
    missing attribute); "SUV" = the rescaled values already are SUVbw, used as they are.
    ``datasets``: the folder's images already read (``read_images``), so that several series of one folder
    (a PET/CT study) are read from disk once.
    """
    if pet_units not in PET_UNITS:
        raise ValueError(f"pet_units must be None (SUV from the header) or 'SUV', got {pet_units!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomSeriesError(f"{folder} is not a folder")
    datasets = _read_all(folder) if datasets is None else datasets
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
        pixels = _pixels(ds, series_uid)
        if pixels.shape != (rows, cols):
            raise DicomSeriesError(f"series {series_uid}: image of shape {pixels.shape} is not {rows}x{cols} "
                                   "(multi-frame or colour images are not supported)")
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        volume[:, :, k] = (pixels.astype(np.float32) * slope + intercept).T
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = r * dc, c * dr, n * ds_
    lps[:3, 3] = positions[0]
    modality = str(slices[0].get("Modality", ""))
    units = {"CT": "HU"}.get(modality, "")
    if modality == "PT":
        if pet_units is None:
            try:
                factors = suv_factors(slices)
            except DicomSeriesError as exc:
                raise DicomSeriesError(f"series {series_uid}: {exc}") from None
            volume *= factors[None, None, :]
            log.info("series %s: PET Units %s -> SUVbw, factor %.6g (g/Bq%s)", series_uid, slices[0].get("Units"),
                     float(factors[0]), ", per image" if np.ptp(factors) > 0 else "")
        units = "SUVbw"
    return DicomSeries(volume, LPS_TO_RAS @ lps, tuple(slices), series_uid, modality, units)


def _syntax(ts) -> str:
    return f"{ts.name} ({ts})" if ts.name != str(ts) else str(ts)


def _pixels(ds, series_uid: str) -> np.ndarray:
    """One image's stored values (rows x columns), decoded whatever the transfer syntax; refused naming why."""
    ts = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if ts is not None and ts.is_compressed:
        from pydicom.pixels import get_decoder

        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            raise DicomSeriesError(f"series {series_uid}: transfer syntax {_syntax(ts)} is not supported "
                                   "(no pixel decoder exists for it)") from None
        if not decoder.is_available:
            raise DicomSeriesError(
                f"series {series_uid}: no decoder installed for transfer syntax {_syntax(ts)}; install the "
                f"pylibjpeg plugins (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle): "
                f"{'; '.join(decoder.missing_dependencies)}")
    samples, photometric = int(ds.get("SamplesPerPixel", 1) or 1), str(ds.get("PhotometricInterpretation", ""))
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2", ""):
        raise DicomSeriesError(f"series {series_uid}: {photometric or 'colour'} images with {samples} samples per "
                               "pixel are not supported (greyscale MONOCHROME1/2 only)")
    try:
        # MONOCHROME1 only inverts the display; stored values map through Rescale the same way
        return ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - broken or truncated pixel data
        raise DicomSeriesError(f"series {series_uid}: cannot decode pixel data of {ds.get('SOPInstanceUID')} "
                               f"({_syntax(ts) if ts is not None else 'no transfer syntax'}): {exc}") from None


def _dicom_datetime(date, time, what: str):
    """A naive datetime from DICOM DA + TM strings (time zone offsets are ignored: one site, one clock)."""
    from datetime import datetime

    from pydicom.valuerep import DA, TM

    try:
        t = TM(str(time).replace(":", "").strip())
        d = DA(str(date).replace(".", "").strip()) if date else None
    except ValueError as exc:
        raise DicomSeriesError(f"{what} is invalid ({date!r} {time!r}): {exc}") from None
    if t is None:
        raise DicomSeriesError(f"{what} is empty")
    if d is None:
        return datetime.combine(datetime(1900, 1, 1), t).replace(tzinfo=None)
    return datetime.combine(d, t).replace(tzinfo=None)


def suv_factors(datasets) -> np.ndarray:
    """Per image, the factor turning rescaled PET values into body-weight SUV (g/ml), from the header.

    SUVbw = value [Bq/ml] * PatientWeight [g] / dose decayed to the reference time [Bq], with
    RadionuclideTotalDose, RadionuclideHalfLife and the injection time from the first item of
    RadiopharmaceuticalInformationSequence (the vendors' and QIBA's body-weight SUV):

    - Units GML: already SUVbw, factor 1. BQML: converted. Anything else (CNTS, ...): refused.
    - DecayCorrection START (images decay-corrected to the acquisition start): the dose is decayed
      from the injection to the series start, SeriesDate/SeriesTime, unless that is after the earliest
      AcquisitionDate/AcquisitionTime of the series (a series re-created after the scan), in which
      case the earliest acquisition time is used (QIBA's flowchart without vendor private tags).
      ADMIN (corrected to the injection): no decay. NONE (not decay corrected): the dose is decayed
      to each image's own AcquisitionTime, so the factor varies per image.
    - The injection time is RadiopharmaceuticalStartDateTime, else RadiopharmaceuticalStartTime on
      the date of the scan (a day earlier when that would put it after the scan: injected before
      midnight).

    Raises ``DicomSeriesError`` naming the missing or invalid attribute.
    """
    ds0 = datasets[0]
    hint = "cannot compute SUV; pass pet_units='SUV' (CLI: --pet-units SUV) if the pixel values are already SUV"
    units = str(ds0.get("Units", "")).upper()
    ones = np.ones(len(datasets), dtype=np.float32)
    if units == "GML":
        return ones
    if units != "BQML":
        raise DicomSeriesError(f"Units {units or 'is missing'}{' is not BQML or GML' if units else ''}: {hint}")

    def number(ds, keyword):
        if keyword not in ds or ds[keyword].value in (None, ""):
            raise DicomSeriesError(f"{keyword} is missing: {hint}")
        try:
            value = float(ds[keyword].value)
        except (TypeError, ValueError):
            raise DicomSeriesError(f"{keyword} {ds[keyword].value!r} is not a number: {hint}") from None
        if not np.isfinite(value) or value <= 0:
            raise DicomSeriesError(f"{keyword} {value:g} is not positive: {hint}")
        return value

    weight_g = number(ds0, "PatientWeight") * 1000.0
    decay = str(ds0.get("DecayCorrection", "")).upper()
    if decay not in ("START", "ADMIN", "NONE"):
        raise DicomSeriesError(f"DecayCorrection {decay or 'is missing'}{' is not START, ADMIN or NONE' if decay else ''}"
                               f": {hint}")
    seq = ds0.get("RadiopharmaceuticalInformationSequence")
    if not seq:
        raise DicomSeriesError(f"RadiopharmaceuticalInformationSequence is missing: {hint}")
    radio = seq[0]
    dose = number(radio, "RadionuclideTotalDose")
    if decay == "ADMIN":
        return ones * np.float32(weight_g / dose)
    half_life = number(radio, "RadionuclideHalfLife")

    def acquired(ds):
        if not ds.get("AcquisitionTime"):
            return None
        return _dicom_datetime(ds.get("AcquisitionDate") or ds0.get("SeriesDate") or ds0.get("StudyDate"),
                               ds.AcquisitionTime, "AcquisitionTime")

    if decay == "START":
        acquisitions = [t for t in (acquired(ds) for ds in datasets) if t is not None]
        earliest = min(acquisitions) if acquisitions else None
        series = (_dicom_datetime(ds0.get("SeriesDate") or ds0.get("StudyDate"), ds0.SeriesTime, "SeriesTime")
                  if ds0.get("SeriesTime") else None)
        if series is None and earliest is None:
            raise DicomSeriesError(f"SeriesTime and AcquisitionTime are missing: {hint}")
        reference = [series if series is not None and (earliest is None or series <= earliest) else earliest]
        reference *= len(datasets)
    else:  # NONE: each image decays from the injection to its own acquisition
        reference = [acquired(ds) for ds in datasets]
        if any(t is None for t in reference):
            raise DicomSeriesError(f"AcquisitionTime is missing on some images (DecayCorrection NONE): {hint}")
    if radio.get("RadiopharmaceuticalStartDateTime"):
        from pydicom.valuerep import DT

        try:
            injected = DT(str(radio.RadiopharmaceuticalStartDateTime)).replace(tzinfo=None)
        except ValueError:
            raise DicomSeriesError(f"RadiopharmaceuticalStartDateTime {radio.RadiopharmaceuticalStartDateTime!r} is "
                                   f"invalid: {hint}") from None
        midnight = False
    elif radio.get("RadiopharmaceuticalStartTime"):
        injected = _dicom_datetime(reference[0].strftime("%Y%m%d"), radio.RadiopharmaceuticalStartTime,
                                   "RadiopharmaceuticalStartTime")
        midnight = True
    else:
        raise DicomSeriesError(f"RadiopharmaceuticalStartTime is missing: {hint}")
    from datetime import timedelta

    if midnight and injected > min(reference):
        injected -= timedelta(days=1)
    delays = np.array([(t - injected).total_seconds() for t in reference])
    if (delays < 0).any():
        raise DicomSeriesError(f"the injection ({injected.isoformat()}) is after the scan ({min(reference).isoformat()}):"
                               f" {hint}")
    decayed = dose * np.exp2(-delays / half_life)
    return (weight_g / decayed).astype(np.float32)


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


@dataclass(frozen=True)
class PetHeader:
    """The PET attributes ``write_series`` writes for modality "PT"; None leaves an attribute out.

    Times are DICOM TM strings on ``date``; ``acquisition_times`` (one per slice) defaults to the
    series time for every slice. The written pixel values are the volume as given (Bq/ml for BQML).
    """
    units: str | None = "BQML"
    decay_correction: str | None = "START"
    patient_weight_kg: float | None = 75.0
    injected_dose_bq: float | None = 370e6
    half_life_s: float | None = 6586.2                  # F-18
    injection_time: str | None = "110000"
    injection_datetime: str | None = None               # RadiopharmaceuticalStartDateTime (DT), when given
    date: str = "20261122"
    series_time: str | None = "120000"
    acquisition_times: tuple[str, ...] | None = None
    radiopharmaceutical_sequence: bool = True           # False: no RadiopharmaceuticalInformationSequence


SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
               "PT": "1.2.840.10008.5.1.4.1.1.128"}


def write_series(volume: np.ndarray, affine: np.ndarray, folder: str | Path, *, modality: str = "CT",
                 body_part: str = "ABDOMEN", series_description: str = "", patient_id: str = "PHANTOM",
                 study_uid: str | None = None, series_uid: str | None = None,
                 pet: PetHeader | None = None, frame_of_reference_uid: str | None = None) -> list[Path]:
    """A volume + RAS affine as a single-frame DICOM series (CT, MR or PET Image Storage), 16-bit signed.

    Slices go along array axis 2; ``read_series`` gives back ``normal_ordered(volume, affine)``:
    exactly this array and affine, or both reversed along the slice axis (same world positions).
    For PT, ``pet`` (default ``PetHeader()``) gives Units, DecayCorrection, PatientWeight, the
    radiopharmaceutical and the times; the values are written with RescaleIntercept 0 (as PET requires).
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
    sop_class = SOP_CLASSES.get(modality)
    if sop_class is None:
        raise ValueError(f"write_series writes {', '.join(SOP_CLASSES)}, not {modality!r}")
    slope = 1.0
    lo, hi = float(volume.min()), float(volume.max())
    intercept = -1024.0 if modality == "CT" else 0.0
    if modality == "PT":      # continuous values: use the whole 16-bit range
        slope = max(abs(hi), abs(lo), 1e-12) / 32767
        pet = pet or PetHeader()
        if pet.acquisition_times is not None and len(pet.acquisition_times) != volume.shape[2]:
            raise ValueError(f"PetHeader.acquisition_times has {len(pet.acquisition_times)} values for "
                             f"{volume.shape[2]} slices")
    elif hi - intercept > 32767 or lo - intercept < -32768:
        slope = max(hi - intercept, intercept - lo) / 32767
    study_uid, series_uid = study_uid or generate_uid(), series_uid or generate_uid()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    frame_uid = frame_of_reference_uid or generate_uid()   # shared by the series of one PET/CT acquisition
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
        elif modality == "PT":
            _pet_attributes(ds, pet, k, volume.shape[2])
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "3D"
            ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "500", "10", "1"
        stored = np.round((volume[:, :, k].T - intercept) / slope).astype(np.int16)
        ds.PixelData = stored.tobytes()
        path = folder / f"slice_{k:04d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def _pet_attributes(ds, pet: PetHeader, k: int, n_slices: int) -> None:
    """PET Series, PET Isotope and PET Image module attributes of slice ``k`` (those in ``pet`` that are not None)."""
    from pydicom.dataset import Dataset

    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = pet.date
    for keyword in ("SeriesTime", "AcquisitionTime"):
        if keyword in ds:
            delattr(ds, keyword)
    if pet.series_time is not None:
        ds.SeriesTime = pet.series_time
    acquisition = pet.acquisition_times[k] if pet.acquisition_times is not None else pet.series_time
    if acquisition is not None:
        ds.AcquisitionTime = ds.ContentTime = acquisition
    if pet.units is not None:
        ds.Units = pet.units
    if pet.decay_correction is not None:
        ds.DecayCorrection = pet.decay_correction
        if pet.decay_correction != "NONE":
            ds.DecayFactor = "1"
    if pet.patient_weight_kg is not None:
        ds.PatientWeight = f"{pet.patient_weight_kg:g}"
    ds.CountsSource, ds.SeriesType = "EMISSION", ["STATIC", "IMAGE"]
    ds.CorrectedImage = ["ATTN", "DECY"] if pet.decay_correction not in (None, "NONE") else ["ATTN"]
    ds.RandomsCorrectionMethod, ds.AttenuationCorrectionMethod, ds.ReconstructionMethod = "DLYD", "CT", "OSEM"
    ds.NumberOfSlices, ds.ImageIndex = n_slices, k + 1
    ds.FrameReferenceTime, ds.ActualFrameDuration = "0", "120000"
    ds.CollimatorType = "NONE"
    if pet.radiopharmaceutical_sequence:
        item = Dataset()
        item.Radiopharmaceutical = "Fluorodeoxyglucose"
        if pet.injection_time is not None:
            item.RadiopharmaceuticalStartTime = pet.injection_time
        if pet.injection_datetime is not None:
            item.RadiopharmaceuticalStartDateTime = pet.injection_datetime
        if pet.injected_dose_bq is not None:
            item.RadionuclideTotalDose = f"{pet.injected_dose_bq:.10g}"
        if pet.half_life_s is not None:
            item.RadionuclideHalfLife = f"{pet.half_life_s:g}"
        item.RadionuclidePositronFraction = "0.97"
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "77004003", "SCT", "^18^Fluorine"
        item.RadionuclideCodeSequence = [code]
        ds.RadiopharmaceuticalInformationSequence = [item]
    ds.PatientOrientationCodeSequence, ds.PatientGantryRelationshipCodeSequence = [], []
