"""Command line of the DuPLUS clients.

    python -m clients segment <nifti-file|dicom-dir> [--t1 TEXT] --targets liver spleen --out OUT
        [--url 127.0.0.1:8001 | --repository model_repository] [--modality CT] [--png]

    python -m clients prognose <nifti-file|dicom-dir> --ehr "63-year-old man, p16-negative ..." [--t1 TEXT]

    python -m clients segment-petct [--ct <nifti-file|dicom-dir>] [--pet <nifti-file|dicom-dir>] --out OUT
    python -m clients segment-petct --study <dicom-dir with the CT and PET series> --out OUT

``segment-petct`` sends a head-and-neck CT, PET or both (each in its own geometry, one frame of reference) to
Triton's ``segment_petct`` (PEMMA) and writes ``labels.nii.gz`` (1 primary tumour, 2 lymph node) on the CT's grid
(the PET's without a CT), ``seg.dcm`` when that image is a DICOM series (referencing the PET series too when it is
one of the same study), and ``result.json``; ``--study`` pairs a study's CT and PET series by Frame of Reference.

``segment`` sends the volume to Triton's ``segment_volume`` over gRPC and writes, in OUT:
``labels.nii.gz`` (uint8 in the input's own geometry), for a DICOM series also ``seg.dcm``
(DICOM SEG referencing the source instances), ``overlay.png`` with ``--png``, and
``result.json`` (prompts as sent, resolved targets, similarity, geometry, seconds). Without
``--t1`` the context prompt is derived from the DICOM header (Modality, BodyPartExamined,
SeriesDescription) and logged; a NIfTI input needs ``--t1`` and ``--modality``. A PET series is
converted to body-weight SUV from its header (``--pet-units SUV`` when its values already are SUV).

Errors a user can cause or meet (a bad series, a missing header field, an unreachable server, an
error answered by the server, a timeout) end the command with one line naming the problem on
stderr and exit code 2, never a traceback; an unexpected error (a bug) exits 1 with one line, and
``--log-level DEBUG`` shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

log = logging.getLogger("clients")


class UsageError(Exception):
    """A problem with what the user asked for; the message is the one line the command prints."""


def _load(path: Path, series_uid: str | None, pet_units: str | None = None):
    """(volume, affine, DicomSeries or None)."""
    if path.is_dir():
        from clients.dicom_io import read_series

        s = read_series(path, series_uid, pet_units=pet_units)
        return s.volume, s.affine, s
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - nibabel raises several types for a file that is not an image
        raise UsageError(f"{path} is neither a DICOM folder nor a readable NIfTI file ({_one_line(exc)})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    return data, img.affine, None


def _client(stack: ExitStack, args, log_file: Path | None = None):
    """A checked ``SegmentationClient`` of ``--url``, or of a local server on ``--repository`` started for the
    command (stopped when ``stack`` closes)."""
    from clients.grpc_client import SegmentationClient

    url = args.url
    if url is None:
        from serving.serve import TritonServer

        server = stack.enter_context(TritonServer(args.repository, checkpoint=args.checkpoint or None,
                                                  log_file=log_file))
        url = server.grpc_url
    client = stack.enter_context(SegmentationClient(url, timeout_s=args.timeout))
    client.check_ready()
    return client


def segment(args) -> int:
    import nibabel as nib

    src = Path(args.input)
    if not src.exists():
        log.error("input not found: %s", src)
        return 2
    volume, affine, series = _load(src, args.series_uid, args.pet_units)
    t1, modality, note = args.t1, args.modality, None
    if series is None and modality is None:
        log.error("a NIfTI input needs --modality (there is no header to derive it from); --t1 too, unless the "
                  "server's context classifier may choose it")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        client = _client(stack, args, out / "triton.log")
        if t1 is None or modality is None:
            from clients.dicom_seg import t1_for_series

            def classify():
                try:
                    return client.classify_context(volume, affine)
                except Exception as exc:  # noqa: BLE001 - one line naming what the header lacks and what failed
                    raise UsageError(f"the header does not say enough for a T1 prompt and the server's context "
                                     f"classifier could not fill it in ({_one_line(exc, 200)}); give --t1") from None

            if series is not None:   # the header, and where it names no region, the context classifier
                ctx = t1_for_series(series.datasets[0], classify)
                t1, modality, note = t1 or ctx.t1, modality or ctx.modality, ctx.note
            else:                    # a NIfTI with --modality: the classifier's region for that modality
                from clients.dicom_seg import classifier_t1
                from duplus.context.guard import ImageContradictsHeader

                try:
                    t1, key, p = classifier_t1(classify(), modality, source="--modality")
                except ImageContradictsHeader as exc:
                    raise UsageError(f"no T1 prompt from the context classifier: {exc}; give --t1") from None
                note = f"T1 {t1!r} from the context classifier ({key}, p = {p:.2f} among the {modality} contexts)"
                log.warning("%s", note)
        context = None
        if args.instructions == "auto" and series is not None:   # what the DICOM header tells the generator
            from duplus.instructions import ImageContext

            context = ImageContext.from_dicom(series.datasets[0]).request_fields()
        t0 = time.perf_counter()
        res = client.segment_volume(volume, affine, modality, t1, args.targets,
                                    instructions=args.instructions if args.instructions != "names" else None,
                                    context=context, strict_context=args.strict_context)
        seconds = time.perf_counter() - t0
    from clients.dicom_seg import contradiction_note

    contradiction = contradiction_note(t1, res.context_verdict)
    if contradiction:
        log.warning("%s", contradiction)
    nib.save(nib.Nifti1Image(res.labels, affine), str(out / "labels.nii.gz"))
    files = ["labels.nii.gz"]
    if series is not None:
        from clients.dicom_seg import write_seg

        write_seg(series, res.labels, list(args.targets), list(res.resolved), out / "seg.dcm")
        files.append("seg.dcm")
    if args.png:
        from duplus.visualize import overlay_png

        overlay_png(volume, res.labels, affine, out / "overlay.png", list(args.targets),
                    window=(-200.0, 300.0) if modality == "CT" else None, title=f"T1 = '{t1}'",
                    convention=args.convention)
        files.append("overlay.png")
    summary = {"input": str(src), "modality": modality, "t1": t1, "stem": res.stem, "targets": list(args.targets),
               "resolved": list(res.resolved), "similarity": [round(s, 4) for s in res.similarity],
               "conditioned_by": list(res.conditioned_by),
               "shape": list(volume.shape), "affine": np.round(affine, 6).tolist(),
               "voxels_per_label": np.bincount(res.labels.ravel(), minlength=len(args.targets) + 1).tolist(),
               "t1_note": note, "context_verdict": res.context_verdict,
               "seconds": round(seconds, 3), "files": files}
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("t1", "resolved", "seconds", "files")}))
    return 0


def prognose(args) -> int:
    src = Path(args.input)
    if not src.exists():
        log.error("input not found: %s", src)
        return 2
    if (args.ehr is None) == (args.ehr_file is None):
        log.error("give the EHR note with exactly one of --ehr TEXT or --ehr-file FILE")
        return 2
    try:
        ehr = args.ehr if args.ehr is not None else Path(args.ehr_file).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the EHR note: {_one_line(exc)}") from None
    volume, affine, series = _load(src, args.series_uid, args.pet_units)
    t1, modality = args.t1, args.modality
    if series is not None and (t1 is None or modality is None):
        from clients.dicom_seg import derive_t1

        d_t1, d_mod, _ = derive_t1(series.datasets[0])
        t1, modality = t1 or d_t1, modality or d_mod
    t1, modality = t1 or "PET of the head and neck", modality or "PET"
    with ExitStack() as stack:
        client = _client(stack, args)
        t0 = time.perf_counter()
        res = client.prognose(volume, affine, modality, t1, ehr)
        seconds = time.perf_counter() - t0
    radiomics = {k: round(v, 4) for k, v in res.features.items() if not k.startswith("pooled_")}
    out = {"input": str(src), "modality": modality, "t1": t1, "risk": round(res.risk, 6), "radiomics": radiomics,
           "seconds": round(seconds, 3)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(out, features=res.features), indent=2))
    print(json.dumps(out))
    return 0


def segment_petct(args) -> int:
    import nibabel as nib

    if args.study is not None and (args.ct is not None or args.pet is not None):
        raise UsageError("give --study, or --ct and/or --pet, not both")
    if args.ct is None and args.pet is None and args.study is None:
        raise UsageError("give --ct, --pet or both (or --study with a PET/CT study's DICOM series)")
    images = {}
    if args.study is not None:   # the study's CT and PET series that share a Frame of Reference
        from clients.dicom_io import pair_petct, read_images, read_series

        ct_uid, pet_uid = pair_petct(Path(args.study))
        log.info("paired CT series %s and PET series %s (one Frame of Reference)", ct_uid, pet_uid)
        study = read_images(Path(args.study))      # the folder's pixels read once for both series
        for name, uid in (("CT", ct_uid), ("PET", pet_uid)):
            found = read_series(Path(args.study), uid, pet_units=args.pet_units if name == "PET" else None,
                                datasets=study)
            images[name] = (found.volume, found.affine, found)
    for name, path in (("CT", args.ct), ("PET", args.pet)):
        if path is None:
            continue
        src = Path(path)
        if not src.exists():
            raise UsageError(f"--{name.lower()} not found: {src}")
        images[name] = _load(src, None, args.pet_units if name == "PET" else None)
    series = {k: v[2] for k, v in images.items() if v[2] is not None}
    if len(series) == 2:   # two DICOM series: their world coordinates agree only within one frame of reference
        frames = {k: getattr(v.datasets[0], "FrameOfReferenceUID", None) for k, v in series.items()}
        if frames["CT"] != frames["PET"]:
            raise UsageError(f"the CT and the PET are in different frames of reference (CT {frames['CT']}, PET "
                             f"{frames['PET']}): they must come from one PET/CT acquisition")
    reference = "CT" if "CT" in images else "PET"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        client = _client(stack, args, out / "triton.log")
        t0 = time.perf_counter()
        res = client.segment_petct(*(images["CT"][:2] if "CT" in images else (None, None)),
                                   *(images["PET"][:2] if "PET" in images else (None, None)))
        seconds = time.perf_counter() - t0
    volume, affine, ref_series = images[reference]
    nib.save(nib.Nifti1Image(res.labels, affine), str(out / "labels.nii.gz"))
    files = ["labels.nii.gz"]
    targets = list(res.label_names[1:])
    if ref_series is not None:
        from clients.dicom_seg import write_seg

        other = series.get("PET") if reference == "CT" else None
        if other is not None and other.datasets[0].StudyInstanceUID != ref_series.datasets[0].StudyInstanceUID:
            other = None          # a SEG references series of its own study only
        write_seg(ref_series, res.labels, targets, targets, out / "seg.dcm", model_name="PEMMA",
                  further_series=other)
        files.append("seg.dcm")
    summary = {"ct": args.ct, "pet": args.pet, "study": args.study, "mode": res.mode, "grid": reference, "labels": targets,
               "shape": list(volume.shape), "affine": np.round(affine, 6).tolist(),
               "voxels_per_label": np.bincount(res.labels.ravel(), minlength=len(res.label_names)).tolist(),
               "seconds": round(seconds, 3), "files": files}
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("mode", "voxels_per_label", "seconds", "files")}))
    return 0


def _server_options(parser: argparse.ArgumentParser) -> None:
    """--url, --repository, --checkpoint, --timeout: the server a command talks to (see ``_client``)."""
    parser.add_argument("--url", default=None, help="gRPC url of a running Triton server (default: start one)")
    parser.add_argument("--repository", default="model_repository", help="repository to serve when no --url")
    parser.add_argument("--checkpoint", default="checkpoints/duplus_demo.pt",
                        help="checkpoint the repository must be built from (stale check) when no --url")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clients", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log-level", default="INFO", help="logging level")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("segment", help="segment one NIfTI file or DICOM series through Triton",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("input", help="a NIfTI file (.nii/.nii.gz) or a folder holding one DICOM series")
    s.add_argument("--targets", nargs="+", required=True, help="target prompts, e.g. liver 'left kidney'")
    s.add_argument("--t1", default=None, help="context prompt, e.g. 'CT of the abdomen' (default: from the DICOM header; "
                   "where the header names no region, or for a NIfTI, the server's context classifier's)")
    s.add_argument("--strict-context", action="store_true",
                   help="refuse a T1 that the server's context classifier finds contradicting the image (INVALID_ARGUMENT) "
                        "instead of segmenting with it and reporting the contradiction")
    s.add_argument("--modality", choices=("CT", "MR", "PET"), default=None,
                   help="what the volume is, which picks its intensity normalisation (default: from the DICOM "
                        "header's Modality); the stem is the modality the T1 names, this one when it names none")
    s.add_argument("--series-uid", default=None, help="which series, when the folder holds several")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--png", action="store_true", help="also write an overlay PNG")
    s.add_argument("--convention", choices=("radiological", "neurological"), default="radiological",
                   help="overlay orientation: radiological (patient's right on the image's left, as radiologists "
                        "read) or neurological (patient's right on the right)")
    s.add_argument("--pet-units", choices=("SUV",), default=None,
                   help="a PET series' values are already SUV (default: convert Bq/ml to body-weight SUV from the "
                        "header, refusing when an attribute it needs is missing)")
    s.add_argument("--instructions", choices=("names", "auto"), default="names",
                   help="auto: the server's instruction generator writes each target's instruction from the image's "
                        "context (the DICOM header's fields, else the T1 words and the affine) and it conditions the "
                        "head (Zeus); result.json says which text conditioned each target")
    _server_options(s)
    n = sub.add_parser("dicom-node", help="run the DICOM node (C-STORE SCP -> Triton -> DICOM SEG -> C-STORE)",
                       description="Run the DICOM node until Ctrl-C/SIGTERM; see clients/dicom_node.py.")
    n.add_argument("--config", required=True, help="YAML with the NodeConfig fields (configs/dicom_node.yaml)")
    w = sub.add_parser("dicomweb", help="segment a study from a DICOMweb PACS and store the SEGs back",
                       description="QIDO-RS -> WADO-RS -> Triton -> STOW-RS; see clients/dicomweb.py.")
    w.add_argument("--url", required=True, help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    w.add_argument("--study", required=True, help="StudyInstanceUID")
    w.add_argument("--series", default=None, help="only this SeriesInstanceUID (default: every image series)")
    w.add_argument("--targets", nargs="+", default=None, help="target prompts (default: per modality and region)")
    w.add_argument("--t1", default=None, help="context prompt (default: from the header)")
    w.add_argument("--triton-url", default="127.0.0.1:8001", help="gRPC url of the Triton server")
    w.add_argument("--pet-units", choices=("SUV",), default=None,
                   help="PET series' values are already SUV (default: body-weight SUV from the header)")
    p = sub.add_parser("prognose", help="risk score from a PET volume and the patient's EHR note (Triton prognose)",
                       description="Send a PET (NIfTI or DICOM series) and the EHR note to Triton's prognose model; "
                                   "prints the risk (log hazard ratio, higher = worse) and the lesion radiomics used.")
    p.add_argument("input", help="a NIfTI file or a folder holding one DICOM series (PET of the head and neck)")
    p.add_argument("--ehr", default=None, help="the EHR note as text")
    p.add_argument("--ehr-file", default=None, help="a UTF-8 text file holding the EHR note")
    p.add_argument("--t1", default=None, help="context prompt (default: from the DICOM header, else "
                   "'PET of the head and neck')")
    p.add_argument("--modality", choices=("CT", "MR", "PET"), default=None,
                   help="what the volume is (intensity normalisation; stem when the T1 names no modality; "
                        "default: header, else PET)")
    p.add_argument("--series-uid", default=None, help="which series, when the folder holds several")
    p.add_argument("--pet-units", choices=("SUV",), default=None,
                   help="the PET series' values are already SUV (default: body-weight SUV from the header)")
    p.add_argument("--out", default=None, help="also write the result with every image feature to this JSON file")
    _server_options(p)
    q = sub.add_parser("segment-petct", help="head-and-neck tumour and nodes from a CT, a PET or both (Triton "
                       "segment_petct, PEMMA)", description="Send a CT, a PET or both of one patient (NIfTI files or "
                       "DICOM series folders, each in its own geometry) to Triton's segment_petct; writes labels "
                       "(1 primary tumour, 2 lymph node) on the CT's grid, the PET's without a CT.")
    q.add_argument("--ct", default=None, help="the CT: a NIfTI file or a folder holding one DICOM series")
    q.add_argument("--pet", default=None, help="the PET: a NIfTI file (SUV) or a folder holding one DICOM series")
    q.add_argument("--study", default=None, help="instead of --ct/--pet: a folder of DICOM series; its CT and PET "
                   "series that share a Frame of Reference are paired (the SEG references both)")
    q.add_argument("--pet-units", choices=("SUV",), default=None,
                   help="the PET series' values are already SUV (default: body-weight SUV from the header)")
    q.add_argument("--out", required=True, help="output folder")
    _server_options(q)
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except Exception as exc:  # noqa: BLE001 - every failure ends in one line; only a bug keeps its traceback (DEBUG)
        message, code = explain(exc, args)
        log.error("%s", message)
        if code != 2:
            log.debug("traceback of the unexpected error", exc_info=True)
        return code


def dicomweb(args) -> int:
    from clients.dicomweb import segment_study

    uids = segment_study(args.url, args.study, triton_url=args.triton_url, series_uid=args.series,
                         targets=args.targets, t1=args.t1, pet_units=args.pet_units)
    print("\n".join(uids))
    return 0


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def explain(exc: BaseException, args) -> tuple[str, int]:
    """(the one line the command prints, exit code): 2 for what a user can cause or fix, 1 for a bug."""
    from clients.dicom_io import DicomSeriesError
    from clients.grpc_client import RequestTimeout, ServerMismatchError

    url = getattr(args, "url", None) if args.command != "dicomweb" else args.triton_url
    if isinstance(exc, UsageError):
        return str(exc), 2
    if isinstance(exc, DicomSeriesError):
        return f"cannot use the DICOM series: {_one_line(exc)}", 2
    if isinstance(exc, RequestTimeout):
        return f"{_one_line(exc)}; raise --timeout or check the server's load", 2
    if isinstance(exc, ServerMismatchError):
        return f"the server does not serve what this client expects: {_one_line(exc)}", 2
    if isinstance(exc, ConnectionError):
        return f"cannot reach the Triton server{f' at {url}' if url else ''}: {_one_line(exc)} " \
               "(is it running? `make serve` starts one)", 2
    if type(exc).__name__ == "InferenceServerException":
        from clients.grpc_client import is_transient

        status = str(exc.status() or "") if hasattr(exc, "status") else ""
        text = _one_line(exc.message() if hasattr(exc, "message") and exc.message() else exc)
        if is_transient(exc):
            return f"the Triton server{f' at {url}' if url else ''} is unavailable ({status}): {text}", 2
        return f"the server refused the request ({status or 'error'}): {text}", 2
    if type(exc).__module__.startswith("psycopg") or type(exc).__name__ == "QueueUnavailable":
        queue = getattr(args, "queue_url", None) or "its queue_url"
        return f"cannot use the job queue ({queue}): {_one_line(exc)}", 2
    if type(exc).__name__ in ("RepositoryError", "ServerError"):
        return f"cannot start a local Triton server: {_one_line(exc)}", 2
    if isinstance(exc, (ValueError, KeyError, OSError)):
        # a missing header field (derive_t1, SUV), a SEG that cannot be written, an unreadable file, a PACS error
        return _one_line(exc), 2
    return (f"unexpected error ({type(exc).__name__}: {_one_line(exc)}); this is a bug, please report it with "
            "the output of --log-level DEBUG"), 1


def dicom_node(args) -> int:
    import signal
    import threading

    from clients.dicom_node import DicomNode, NodeConfig

    node = DicomNode(NodeConfig.from_yaml(args.config)).start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    node.stop()
    return 0


COMMANDS = {"segment": segment, "prognose": prognose, "segment-petct": segment_petct, "dicom-node": dicom_node,
            "dicomweb": dicomweb}

if __name__ == "__main__":
    sys.exit(main())
