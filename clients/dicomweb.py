"""Segment a study from any DICOMweb PACS: QIDO-RS to find its image series, WADO-RS to retrieve
them, Triton to segment, STOW-RS to store each DICOM SEG back (dicomweb-client).

    python -m clients dicomweb --url http://127.0.0.1:8042/dicom-web --study 1.2.3... --triton-url 127.0.0.1:8001
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

IMAGE_MODALITIES = ("CT", "MR", "PT")


def segment_study(dicomweb_url: str, study_uid: str, *, triton_url: str, series_uid: str | None = None,
                  targets: list[str] | None = None, t1: str | None = None,
                  default_targets: dict[str, tuple[str, ...]] | None = None, pet_units: str | None = None,
                  model_name: str = "DuPLUS", model_version: str = "0.1.0") -> list[str]:
    """SOP Instance UIDs of the SEGs stored back, one per segmented image series.

    Compressed instances (JPEG, JPEG-LS, JPEG 2000, RLE) are decoded by pydicom's pylibjpeg plugins; a PET
    series goes in as body-weight SUV (``pet_units="SUV"``: its values already are). The series' folders are
    named by their position, never by a UID the PACS sent.
    """
    import pydicom
    from dicomweb_client.api import DICOMwebClient

    from clients.dicom_io import read_series
    from clients.dicom_node import NodeConfig
    from clients.dicom_seg import derive_region, derive_t1, seg_uids, write_seg
    from clients.grpc_client import SegmentationClient

    web = DICOMwebClient(url=dicomweb_url)
    found = web.search_for_series(study_instance_uid=study_uid)                       # QIDO-RS
    series = [pydicom.Dataset.from_json(s) for s in found]
    series = [s for s in series if str(s.get("Modality", "")) in IMAGE_MODALITIES
              and (series_uid is None or s.SeriesInstanceUID == series_uid)]
    if not series:
        raise ValueError(f"study {study_uid} has no {'series ' + series_uid if series_uid else 'image series'} "
                         f"at {dicomweb_url}")
    defaults = default_targets or NodeConfig().targets
    stored = []
    with SegmentationClient(triton_url) as client, tempfile.TemporaryDirectory() as tmp:
        for n, s in enumerate(tqdm(series, desc="dicomweb series", unit="series", disable=None)):
            uid = s.SeriesInstanceUID
            # as stored ("*": no transcoding asked of the PACS; pydicom decodes what arrives, as on the node)
            instances = web.retrieve_series(study_instance_uid=study_uid, series_instance_uid=uid,   # WADO-RS
                                            media_types=(("application/dicom", "*"),))
            folder = Path(tmp) / f"series_{n:03d}"
            folder.mkdir()
            for i, ds in enumerate(instances):
                ds.save_as(str(folder / f"{i:05d}.dcm"), enforce_file_format=True)
            src = read_series(folder, uid, pet_units=pet_units)
            d_t1, modality, _ = derive_t1(src.datasets[0])
            names = targets or list(defaults.get(f"{modality}|{derive_region(src.datasets[0])}", ()))
            if not names:
                raise ValueError(f"series {uid}: no targets given and none configured for its modality and region")
            res = client.segment_volume(src.volume, src.affine, modality, t1 or d_t1, names)
            seg = write_seg(src, res.labels, names, list(res.resolved), folder / "seg.dcm",
                            sop_instance_uid=seg_uids(uid, model_name, model_version)[1])
            web.store_instances(datasets=[seg])                                              # STOW-RS
            stored.append(seg.SOPInstanceUID)
            log.info("series %s: SEG %s stored at %s", uid, seg.SOPInstanceUID, dicomweb_url)
    return stored
