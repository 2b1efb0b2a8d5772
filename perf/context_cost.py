"""What the context classifier (the T1 guard) costs against a whole-volume segmentation, side by side in one run.

    python -m perf.context_cost --repository model_repository

The repository is served as built (``python export/build_engines.py``, which builds the classifier from
``checkpoints/context_dpt.pt``). On each benchmark volume (``perf/volumes.py``), alternately, over gRPC:
``classify_context`` (the views and the classifier: what the guard adds to a request) and ``segment_volume``
(a whole-volume segmentation, the guard included); medians of ``--repeats`` after one warm-up each, and their
ratio. In this process also the views alone (``duplus.context.views.context_views``), the part of the guard
that grows with the volume. Writes ``perf/results/<label>/context_cost.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np

from perf.volumes import VOLUMES, make_volume, t1_prompt

log = logging.getLogger("perf.context_cost")

DEFAULT_VOLUMES = ("ct_256", "ct_abdomen", "ct_head_neck", "pet_head_neck")


def _median_s(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def measure(repository: Path, volumes, repeats: int, out: Path) -> dict:
    from tqdm.auto import tqdm

    from clients.grpc_client import SegmentationClient
    from duplus.context.views import context_views
    from serving.serve import TritonServer

    rows = {}
    with TritonServer(repository, log_file=out / "context_cost_triton.log") as server, \
            SegmentationClient(server.grpc_url) as client:
        for name in tqdm(volumes, desc="volumes"):
            ph = make_volume(name)
            v = VOLUMES[name]
            t1 = t1_prompt(name, ph.sequence)
            targets = v.targets

            def classify(ph=ph, t1=t1):
                return client.classify_context(ph.image, ph.affine, t1)

            def segment(ph=ph, v=v, t1=t1, targets=targets):
                return client.segment_volume(ph.image, ph.affine, v.modality, t1, targets)

            guess = classify()
            seg = segment()                                  # the warm-ups
            c_times, s_times = [], []
            for _ in range(repeats):                         # alternating, so that drift hits both alike
                c_times += _median_s(classify, 1)[1]
                s_times += _median_s(segment, 1)[1]
            views_s, _ = _median_s(lambda ph=ph: context_views(ph.image, ph.affine), repeats)
            c, s = statistics.median(c_times), statistics.median(s_times)
            rows[name] = {"shape": list(ph.image.shape), "classify_s": round(c, 4), "segment_s": round(s, 4),
                          "ratio": round(c / s, 4), "views_s": round(views_s, 4), "context": guess.context,
                          "agrees": seg.context_verdict.get("agrees") if seg.context_verdict else None,
                          "classify_times_s": [round(t, 4) for t in c_times],
                          "segment_times_s": [round(t, 4) for t in s_times]}
            log.info("%s %s: classify %.3f s, segment %.3f s, ratio %.3f", name, ph.image.shape, c, s, c / s)
    return rows


def report(rows: dict, out: Path, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Context classifier cost", "", f"Machine: {machine}. `python -m perf.context_cost`; medians, gRPC, "
             "the same server and volume, alternating requests.", "",
             "| volume | shape | classify_context (s) | segment_volume (s) | ratio | views in process (s) | "
             "looks like | T1 agrees |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {'x'.join(map(str, r['shape']))} | {r['classify_s']:.3f} | {r['segment_s']:.3f} | "
                     f"**{100 * r['ratio']:.1f} %** | {r['views_s']:.3f} | {r['context']} | {r['agrees']} |")
    lines += ["", f"Largest ratio: {100 * max(r['ratio'] for r in rows.values()):.1f} % (bar: < 5 %)."]
    (out / "context_cost.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    names = list(rows)
    x = np.arange(len(names))
    ax.bar(x - 0.2, [rows[n]["segment_s"] for n in names], 0.4, label="segment_volume")
    ax.bar(x + 0.2, [rows[n]["classify_s"] for n in names], 0.4, label="classify_context")
    for i, n in enumerate(names):
        ax.text(i + 0.2, rows[n]["classify_s"], f"{100 * rows[n]['ratio']:.1f} %", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("median latency (s)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("T1 guard cost per request")
    fig.tight_layout()
    fig.savefig(out / "context_cost.png", dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.context_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=Path("model_repository"))
    ap.add_argument("--volumes", nargs="+", default=list(DEFAULT_VOLUMES), choices=sorted(VOLUMES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--label", default=None, help="results go to perf/results/<label>/ (default: cpu-<cores>core)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from perf.bench import default_label
    from perf.measure import machine_info

    out = Path("perf/results") / (args.label or default_label())
    out.mkdir(parents=True, exist_ok=True)
    rows = measure(args.repository, args.volumes, args.repeats, out)
    info = machine_info()
    machine = f"{info.get('cpu', '?')}, {info.get('cores', '?')} cores"
    (out / "context_cost.json").write_text(json.dumps({"machine": info, "volumes": rows}, indent=1))
    report(rows, out, machine)
    print((out / "context_cost.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
