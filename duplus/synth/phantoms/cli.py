"""Command line: ``python -m duplus.synth.phantoms --out OUT --task TASK --region R --modality M``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from duplus.synth.phantoms.acquisition import MODALITIES, MR_SEQUENCES, REGIONS, _acquisition_rngs, random_acquisition
from duplus.synth.phantoms.decathlon import write_decathlon_dataset
from duplus.synth.phantoms.generate import generate_phantom
from duplus.synth.phantoms.preview import preview_png


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m duplus.synth.phantoms",
        description="Write procedurally generated, labelled CT / MR / PET phantoms as a Medical "
        "Segmentation Decathlon task (imagesTr/, labelsTr/, dataset.json).",
    )
    parser.add_argument("--out", required=True, type=Path, help="root folder; the task is written to OUT/TASK")
    parser.add_argument("--task", required=True, help="task name, e.g. Task901_PhantomAbdomenCT; also the file prefix")
    parser.add_argument("--region", required=True, choices=REGIONS, help="body region to draw")
    parser.add_argument(
        "--modality",
        required=True,
        choices=MODALITIES,
        help="imaging modality (abdomen: CT or MR; head_neck: CT or PET)",
    )
    parser.add_argument("--cases", type=int, default=10, help="number of cases to write (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed; case i uses a seed derived from (SEED, i)")
    parser.add_argument(
        "--labelled",
        nargs="+",
        metavar="STRUCTURE",
        help="structures to keep in the label files, renumbered 1..n in this order "
        "(default: all of the region's structures); quote names with spaces, e.g. 'left kidney'",
    )
    parser.add_argument("--sequence", choices=MR_SEQUENCES, help="MR only: fix the sequence (default: drawn per case)")
    parser.add_argument(
        "--preview", action="store_true", help="also write a PNG of three mid-slices per case to OUT/TASK/previews/"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    task_dir = write_decathlon_dataset(
        args.out,
        args.task,
        args.region,
        args.modality,
        args.cases,
        args.seed,
        labelled=args.labelled,
        sequence=args.sequence,
        progress=not args.quiet,
    )
    if args.preview:
        dataset = json.loads((task_dir / "dataset.json").read_text())
        for entry in dataset["training"]:
            acq = None
            if entry["sequence"] is not None:
                acq = dataclasses.replace(
                    random_acquisition(_acquisition_rngs(entry["seed"])[0], args.modality, args.region),
                    sequence=entry["sequence"],
                )
            phantom = generate_phantom(
                args.region, args.modality, entry["seed"], acquisition=acq, anatomy_seed=entry["anatomy_seed"]
            )
            preview_png(phantom, task_dir / "previews" / (Path(entry["image"]).name.removesuffix(".nii.gz") + ".png"))
    print(task_dir)
    return 0
