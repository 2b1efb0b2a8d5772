"""Headless locust load test of ``segment_volume`` over gRPC, loopback only.

    python -m perf.load --users 2 --spawn-rate 1 --duration 60 --volumes ct_head_neck

Prepares the phantom volumes and realistic prompt phrasings (``locust_cases.npz``), starts the Triton
server on the built repository unless ``--url`` names a running one on 127.0.0.1, runs locust
headless with a bounded number of users, spawn rate and duration, and writes
``perf/results/<label>/locust_stats.csv`` (locust's own CSVs) plus ``locust_summary.csv``: per
request name, p50/p95/p99 latency (ms), throughput (requests/s), request and failure counts.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from perf.volumes import VOLUMES, make_volume

log = logging.getLogger("load")

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def write_cases(names: list[str], path: Path) -> Path:
    """The locust cases (read by perf/locustfile.py): each benchmark volume with every T1 paraphrase of its
    modality and region and every synonym of its targets."""
    from duplus.vocabulary import t1_paraphrases, t2_paraphrases

    arrays: dict[str, np.ndarray] = {"count": np.array(len(names))}
    for i, name in enumerate(names):
        ph, targets = make_volume(name), VOLUMES[name].targets
        arrays.update({f"name_{i}": np.array(name), f"volume_{i}": ph.image.astype(np.float32),
                       f"affine_{i}": ph.affine.astype(np.float64), f"modality_{i}": np.array(ph.modality),
                       f"t1_{i}": np.array(t1_paraphrases(ph.modality, ph.region, ph.sequence)),
                       f"targets_{i}": np.array(targets)})
        for j, target in enumerate(targets):
            arrays[f"syn_{i}_{j}"] = np.array(t2_paraphrases(target, descriptions=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def run_locust(url: str, cases: Path, prefix: Path, *, users: int = 2, spawn_rate: float = 1.0,
               duration_s: int = 60, stop_timeout_s: int = 600, timeout_s: float | None = None) -> list[dict]:
    """locust headless against ``url``; returns the summary rows (also written next to ``prefix``).

    After ``duration_s`` the users get ``stop_timeout_s`` to finish the request in flight; the locust
    process itself is killed (and this raises) after ``timeout_s`` (default: both plus 300 s).
    """
    host = url.split("://")[-1]
    if not (host.startswith("127.0.0.1:") or host.startswith("localhost:")):
        raise ValueError(f"load tests run on loopback only, got {url!r}")
    if users < 1 or spawn_rate <= 0 or duration_s < 1:
        raise ValueError("users >= 1, spawn rate > 0 and duration >= 1 s are required")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DUPLUS_LOCUST_CASES=str(cases))
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r",
           str(spawn_rate), "-t", f"{duration_s}s", "--host", host, "--csv", str(prefix), "--only-summary",
           "--stop-timeout", str(stop_timeout_s), "--exit-code-on-error", "1", "--loglevel", "WARNING"]
    log.info("%s", " ".join(cmd))
    limit = timeout_s or duration_s + stop_timeout_s + 300
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as exc:   # subprocess.run has killed it; keep what it printed
        out = b"".join(x if isinstance(x, bytes) else (x or "").encode() for x in (exc.stdout, exc.stderr))
        prefix.with_suffix(".log").write_bytes(out)
        raise RuntimeError(f"locust did not exit within {limit:.0f} s of a {duration_s} s run (killed); its output "
                           f"is in {prefix.with_suffix('.log')}: {out.decode(errors='replace')[-2000:]}") from exc
    prefix.with_suffix(".log").write_text(proc.stdout + proc.stderr)
    stats = Path(f"{prefix}_stats.csv")
    if not stats.is_file():
        raise RuntimeError(f"locust wrote no statistics (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")
    rows = []
    with open(stats) as f:
        for r in csv.DictReader(f):
            rows.append({"name": r["Name"], "requests": int(r["Request Count"]), "failures": int(r["Failure Count"]),
                         "p50_ms": float(r["50%"]), "p95_ms": float(r["95%"]), "p99_ms": float(r["99%"]),
                         "requests_per_s": float(r["Requests/s"]), "users": users, "spawn_rate": spawn_rate,
                         "duration_s": duration_s})
    with open(Path(f"{prefix}_summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=2, help="concurrent locust users (gRPC clients)")
    ap.add_argument("--spawn-rate", type=float, default=1.0, help="users started per second")
    ap.add_argument("--duration", type=int, default=60, help="run time in seconds")
    ap.add_argument("--volumes", nargs="+", default=["ct_head_neck"], choices=sorted(VOLUMES),
                    help="phantom volumes the users pick from (perf/volumes.py)")
    ap.add_argument("--url", default=None, help="gRPC url of a running server on loopback (default: start one)")
    ap.add_argument("--repository", default=str(ROOT / "model_repository"), help="repository to serve when no --url")
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "duplus_demo.pt"),
                    help="checkpoint the repository was built from (stale check)")
    ap.add_argument("--label", default=f"cpu-{os.cpu_count()}core", help="results go to perf/results/<label>/")
    ap.add_argument("--log-level", default="INFO", help="logging level")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = ROOT / "perf" / "results" / args.label
    cases = write_cases(args.volumes, out / "locust_cases.npz")

    def go(url):
        rows = run_locust(url, cases, out / "locust", users=args.users, spawn_rate=args.spawn_rate,
                          duration_s=args.duration)
        for r in rows:
            print(f"{r['name']:35s} n={r['requests']:4d} failures={r['failures']:3d} p50={r['p50_ms']:.0f} ms "
                  f"p95={r['p95_ms']:.0f} ms p99={r['p99_ms']:.0f} ms {r['requests_per_s']:.3f} req/s")
        return 0 if all(r["failures"] == 0 for r in rows) else 1

    if args.url:
        return go(args.url)
    from serving.serve import TritonServer

    with TritonServer(args.repository, checkpoint=args.checkpoint, log_file=out / "triton_load.log") as server:
        return go(server.grpc_url)


if __name__ == "__main__":
    sys.exit(main())
