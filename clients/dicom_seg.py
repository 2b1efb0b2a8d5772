"""DICOM SEG out (highdicom), and T1 (context prompt) derived from the image header.

One segment per target with a SNOMED CT coded property (where one exists), algorithm
identification naming the model and its version, referencing every source instance; frames
follow the source slices, so a SEG frame k overlays source image k.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# canonical target -> (SNOMED CT code, meaning, category code, category meaning)
ANATOMY = "123037004", "Anatomical Structure"
MORPHOLOGY = "49755003", "Morphologically Abnormal Structure"
SNOMED = {
    "liver": ("10200004", "Liver", *ANATOMY),
    "spleen": ("78961009", "Spleen", *ANATOMY),
    "left kidney": ("64033007", "Left kidney", *ANATOMY),
    "right kidney": ("9846003", "Right kidney", *ANATOMY),
    "aorta": ("15825003", "Aorta", *ANATOMY),
    "pancreas": ("15776009", "Pancreas", *ANATOMY),
    "stomach": ("69695003", "Stomach", *ANATOMY),
    "primary tumour": ("86049000", "Malignant neoplasm, primary", *MORPHOLOGY),
    "lymph node": ("59441001", "Lymph node", *ANATOMY),
}

BODY_PARTS = {"abdomen": ("ABDOMEN", "LIVER", "KIDNEY", "PANCREAS", "ABD", "CHESTABDOMEN", "ABDOMENPELVIS"),
              "head_neck": ("HEAD", "NECK", "HEADNECK", "HNECK", "THROAT", "LARYNX", "ORAL", "HEAD_NECK")}
REGION_WORDS = {"abdomen": ("abdomen", "abdominal", "liver", "abd", "kidney", "pancrea"),
                "head_neck": ("head", "neck", "h&n", "hn", "oropharyn", "larynx", "hecktor")}


class RegionUnknown(ValueError):
    """The header names no body region (neither BodyPartExamined nor a SeriesDescription that says)."""


def derive_region(ds) -> str:
    """'abdomen' or 'head_neck' from BodyPartExamined, else from SeriesDescription; ValueError if neither says."""
    body = re.sub(r"[^A-Z_]", "", str(ds.get("BodyPartExamined", "")).upper())
    desc = str(ds.get("SeriesDescription", "")).lower()
    region = next((r for r, parts in BODY_PARTS.items() if body in parts), None) if body else None
    if region is None:
        region = next((r for r, words in REGION_WORDS.items() if any(w in desc for w in words)), None)
    if region is None:
        raise RegionUnknown(f"cannot tell the body region from BodyPartExamined={ds.get('BodyPartExamined')!r} and "
                         f"SeriesDescription={ds.get('SeriesDescription')!r}; give --t1")
    return region


def header_modality(ds) -> str:
    """'CT', 'MR' or 'PET' from the header's Modality; ValueError for any other."""
    modality = {"CT": "CT", "MR": "MR", "PT": "PET"}.get(str(ds.get("Modality", "")).upper())
    if modality is None:
        raise ValueError(f"Modality {ds.get('Modality')!r} has no stem in this model (CT, MR, PT); give --t1 and "
                         "--modality")
    return modality


def header_sequence(ds) -> str | None:
    """An MR series' sequence ('T1', 'T2') from its SeriesDescription's wording, else None."""
    desc = str(ds.get("SeriesDescription", "")).lower()
    if re.search(r"\bt2|t2w|t2-weighted|haste|ssfse", desc):
        return "T2"
    if re.search(r"\bt1|t1w|t1-weighted|vibe|lava|thrive|dixon", desc):
        return "T1"
    return None


def derive_t1(ds) -> tuple[str, str, str | None]:
    """(T1 prompt, modality, MR sequence) from Modality, BodyPartExamined and SeriesDescription.

    Zeus-style instruction generation at the metadata level: the modality picks the stem, the body
    part or the description the region, and for MR the description's T1/T2 wording the sequence.
    Raises ValueError when the header does not say enough (:class:`RegionUnknown` for the region: then
    :func:`t1_for_series` asks the context classifier); the caller then asks for --t1.
    """
    from duplus.vocabulary import canonical_t1

    modality = header_modality(ds)
    region = derive_region(ds)
    sequence = header_sequence(ds) if modality == "MR" else None
    t1 = canonical_t1(modality, region, sequence)
    log.info("derived T1 %r from Modality=%s BodyPartExamined=%s SeriesDescription=%r", t1, ds.get("Modality"),
             ds.get("BodyPartExamined"), ds.get("SeriesDescription"))
    return t1, modality, sequence


@dataclass(frozen=True)
class SeriesContext:
    t1: str
    modality: str
    sequence: str | None
    region: str
    note: str | None = None        # set when the context classifier filled the T1 in


def classifier_t1(result, modality: str, sequence: str | None = None,
                  source: str = "the header") -> tuple[str, str, float]:
    """:func:`duplus.context.guard.fill_t1` on a served :class:`clients.grpc_client.ContextResult`, at the guard alpha
    its verdict carries (the library default from a server that does not send one): (T1, context key, p among the
    ``modality`` contexts); :class:`duplus.context.guard.ImageContradictsHeader` when the image is not of that
    modality."""
    from duplus.context.guard import DEFAULT_ALPHA, fill_t1

    keys = list(result.probabilities)
    return fill_t1(modality, keys, np.array([result.probabilities[k] for k in keys]), sequence,
                   alpha=float(result.verdict.get("alpha", DEFAULT_ALPHA)), source=source)


def t1_for_series(ds, classify=None) -> SeriesContext:
    """The series' T1 prompt: :func:`derive_t1`, and when the header names no body region, the context
    classifier's region for the header's modality (``classify()`` -> a :class:`clients.grpc_client.ContextResult`);
    ``note`` then says so (logged, kept in the job's record). Without ``classify`` a silent header is
    :class:`RegionUnknown`, as before, and so is one whose image the classifier does not take for the header's
    modality (:class:`duplus.context.guard.ImageContradictsHeader`, at the server's guard alpha)."""
    from duplus.context.classes import parse_key
    from duplus.context.guard import ImageContradictsHeader

    try:
        t1, modality, sequence = derive_t1(ds)
        return SeriesContext(t1, modality, sequence, derive_region(ds))
    except RegionUnknown as exc:
        if classify is None:
            raise
        silent = str(exc).split(";")[0]
    modality = header_modality(ds)
    sequence = header_sequence(ds) if modality == "MR" else None
    result = classify()
    try:
        t1, key, p = classifier_t1(result, modality, sequence)
    except ImageContradictsHeader as exc:
        raise RegionUnknown(f"{silent}, and {exc}: check the series and give its T1 prompt") from None
    note = (f"T1 {t1!r} from the context classifier ({key}, p = {p:.2f} among the {modality} contexts; it looks "
            f"like {result.context}): {silent}")
    log.warning("%s", note)
    return SeriesContext(t1, modality, sequence, parse_key(key).region, note)


def contradiction_note(t1: str, verdict: dict | None) -> str | None:
    """A note when the server's T1 guard says the image contradicts ``t1`` (a header that says CT on an MR)."""
    if not verdict or verdict.get("agrees") is not False:
        return None
    return (f"the context (T1) prompt {t1!r} contradicts the image, which looks like {verdict.get('t1')!r} "
            f"(p = {verdict.get('probability')}): {verdict.get('reason')}")


def seg_uids(source_series_uid: str, model_name: str = "DuPLUS", model_version: str = "0.1.0") -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the SEG of a source series by a model version.

    Deterministic: the same series segmented again by the same model gives the same UIDs (a SEG re-sent
    after a crash is the same object at the PACS); a new model version gives new ones (a new object).
    """
    from pydicom.uid import generate_uid

    key = [source_series_uid, model_name, model_version]
    return generate_uid(entropy_srcs=["duplus-seg-series", *key]), generate_uid(entropy_srcs=["duplus-seg", *key])


class SegWriteError(ValueError):
    """A DICOM SEG that cannot be written for a series; the message names the attribute or the problem."""


# Type 2 attributes of the Patient and General Study modules that highdicom reads from the source image:
# anonymised exports often drop them; the SEG then carries them empty, as the standard allows
SOURCE_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")
# Type 1 attributes a SEG cannot be written without (references and geometry)
SOURCE_TYPE1 = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
                "Modality", "Rows", "Columns", "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")


def _source_for_seg(ds):
    """``ds`` with missing Type 2 patient/study attributes present and empty; ``ds`` itself when none is missing.

    The copy shares the data elements (pixel data included) but not the dataset, so the caller's is unchanged.
    """
    missing = [k for k in SOURCE_TYPE2 if k not in ds]
    if not missing:
        return ds
    from pydicom.dataset import Dataset

    out = Dataset()
    out.update(ds)
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    for keyword in missing:
        setattr(out, keyword, "")
    return out


def write_seg(series, labels: np.ndarray, targets: list[str], resolved: list[str], path, *,
              model_name: str = "DuPLUS", model_version: str = "0.1.0", series_number: int = 900,
              sop_instance_uid: str | None = None, further_series=None):
    """A DICOM SEG for ``labels`` (uint8 on the series grid, value k = targets[k-1]); returns the dataset.

    Its Series and SOP Instance UIDs are ``seg_uids(source series, model_name, model_version)`` (the SOP
    Instance UID overridden by ``sop_instance_uid`` when given). Type 2 patient/study attributes missing
    from the source (anonymised exports) are written empty. ``further_series`` (another series of the same study,
    e.g. the PET of a PET/CT whose CT grid the labels lie on) is referenced as a source too. Raises
    ``SegWriteError`` naming what is missing or wrong for anything else it cannot write.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    labels = np.asarray(labels)
    if labels.shape != series.volume.shape:
        raise SegWriteError(f"labels {labels.shape} do not lie on the series grid {series.volume.shape}")
    if len(targets) != len(resolved):
        raise SegWriteError(f"{len(targets)} targets but {len(resolved)} resolved names")
    if labels.size and (labels.min() < 0 or labels.max() > len(targets)):
        raise SegWriteError(f"label values {int(labels.min())}..{int(labels.max())} outside 0..{len(targets)} "
                            f"({len(targets)} targets)")
    for keyword in SOURCE_TYPE1:
        without = [i for i, ds in enumerate(series.datasets) if ds.get(keyword) in (None, "")]
        if without:
            raise SegWriteError(f"series {series.series_uid}: {keyword} is missing on {len(without)} source image(s) "
                                f"(first: image {without[0]}); a DICOM SEG cannot reference or place them without it")
    series_uid, sop_uid = seg_uids(series.series_uid, model_name, model_version)
    try:
        algorithm = hd.AlgorithmIdentificationSequence(name=model_name, version=model_version,
                                                       family=codes.cid7162.ArtificialIntelligence)
        descriptions = []
        for k, (text, name) in enumerate(zip(targets, resolved), start=1):
            code, meaning, cat, cat_meaning = SNOMED.get(name, ("91723000", "Anatomical structure", *ANATOMY))
            descriptions.append(hd.seg.SegmentDescription(
                segment_number=k, segment_label=text[:64],
                segmented_property_category=hd.sr.CodedConcept(cat, "SCT", cat_meaning),
                segmented_property_type=hd.sr.CodedConcept(code, "SCT", meaning),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm))
        # frames in source-image order: frame k is labels[:, :, k] as rows x columns
        frames = np.ascontiguousarray(np.transpose(labels, (2, 1, 0))).astype(np.uint8)
        seg = hd.seg.Segmentation(
            source_images=[_source_for_seg(ds) for ds in series.datasets], pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
            series_instance_uid=series_uid, series_number=series_number,
            sop_instance_uid=sop_instance_uid or sop_uid, instance_number=1, manufacturer="duplus-stack",
            manufacturer_model_name=model_name, software_versions=model_version, device_serial_number="0",
            content_label="DUPLUS", content_description=f"{model_name} text-prompted segmentation"[:64],
            omit_empty_frames=False,
            further_source_images=[_source_for_seg(ds) for ds in further_series.datasets] if further_series else None)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise SegWriteError(f"series {series.series_uid}: cannot write a DICOM SEG: "
                            f"{type(exc).__name__}: {exc}") from exc
    seg.save_as(str(path))
    log.info("SEG %s (series %s, %s %s) written to %s", seg.SOPInstanceUID, series_uid, model_name, model_version,
             path)
    return seg


def seg_to_labels(seg, series) -> np.ndarray:
    """A SEG's segments mapped back onto the source series grid as a uint8 label volume."""
    import highdicom as hd

    seg = hd.seg.Segmentation.from_dataset(seg) if not isinstance(seg, hd.seg.Segmentation) else seg
    uids = [ds.SOPInstanceUID for ds in series.datasets]
    array = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                              skip_overlap_checks=True)
    return np.ascontiguousarray(np.transpose(array, (2, 1, 0))).astype(np.uint8)
