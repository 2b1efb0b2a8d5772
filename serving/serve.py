"""Start the embedded Triton server (from the nvidia-pytriton wheel) on a generated repository.

    python -m serving.serve --model-repository model_repository --checkpoint checkpoints/duplus_demo.pt

It refuses to start, with a message saying what to do, when the repository is missing, incomplete,
of the ngc flavour, or stale (built from another checkpoint than ``--checkpoint``). It binds
HTTP, gRPC and metrics to loopback, waits until every model is ready, and stops the server
cleanly on SIGINT/SIGTERM. ``TritonServer`` is the same thing as a context manager for tests,
the demo and the benchmarks.

Recovery: Triton never restarts a python-backend stub that died (``kill -9``, the OOM killer): the
model stays "ready" and every request gets ``Stub process '<model>_0_0' is not healthy``. A
``StubWatchdog`` thread watches the stub processes (children of tritonserver) and, when one is gone,
unloads and loads that model through Triton's repository API (Triton reloads the ensembles that use
it by itself). A stub that is alive but hung (Triton answers "not healthy" after a 1 s health check) is
found by ``StubProber``'s cheap probe requests (the server command: every 5 s) and killed, and the same
reload follows. Readiness for a load balancer is the launcher's own health endpoint
(``GET /health/ready`` on ``--health-port``): 200 only when Triton is ready, every served model is
READY, every stub is alive and healthy and no recovery is in flight; Triton's ``/v2/health/ready`` stays 200
while a stub is dead and while a model is unloaded in explicit mode.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.server
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from duplus.files import file_sha256  # noqa: E402

log = logging.getLogger("serve")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODELS = ("instructions", "tokenizer", "text_encoder", "conditioning", "segmenter", "encode_prompts",
          "encode_instructions", "segment_patch", "segment_volume")
# what each model calls (ensemble steps and BLS requests, see export/triton_config.py and serving/triton_models.py):
# serving a subset loads these with it
MODEL_DEPENDENCIES = {
    "encode_prompts": ("tokenizer", "text_encoder", "conditioning"),
    "segment_patch": ("tokenizer", "text_encoder", "conditioning", "segmenter"),
    "encode_instructions": ("instructions", "tokenizer", "text_encoder", "conditioning"),
    "segment_volume": ("encode_prompts", "encode_instructions", "segmenter"),
    "prognose": ("encode_prompts", "image_features", "text_encoder_ehr", "prognosis"),
    "segment_petct": ("pemma_segmenter",),
    "classify_context": ("context_classifier",),
}
# what a model calls only where the repository has it: segment_volume's T1 guard (a repository built without a
# context checkpoint serves segment_volume without it, and the verdict says so)
OPTIONAL_DEPENDENCIES = {"segment_volume": ("context_classifier",)}


def with_dependencies(models, available=()) -> list[str]:
    """``models`` and everything they call, each once, dependencies first; an optional dependency only when it is
    in ``available`` (the repository's models)."""
    out: list[str] = []

    def add(name: str) -> None:
        for dep in MODEL_DEPENDENCIES.get(name, ()) + tuple(d for d in OPTIONAL_DEPENDENCIES.get(name, ())
                                                            if d in available):
            add(dep)
        if name not in out:
            out.append(name)

    for m in models:
        add(m)
    return out


class RepositoryError(RuntimeError):
    """The model repository cannot be served as it is."""


class ServerError(RuntimeError):
    """The Triton server did not start or did not become ready."""


REMOTE_REPOSITORY = ("s3://", "gs://", "as://")     # object stores Triton reads itself


def check_repository(repository: Path, checkpoint: Path | None = None, targets=("embedded",)) -> dict:
    """The repository's manifest, after checking it is complete, of one of ``targets`` (flavours) and built from
    ``checkpoint``."""
    repository = Path(repository)
    rebuild = f"rebuild it with `python export/build_engines.py --output {repository}`"
    manifest_path = repository / "manifest.json"
    if not manifest_path.is_file():
        raise RepositoryError(f"no model repository at {repository} (manifest.json missing); {rebuild}")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("target", "embedded") not in targets:
        raise RepositoryError(f"{repository} is the {manifest.get('target')} flavour"
                              + (", for the NGC Triton container (serve it with --tritonserver "
                                 "/opt/tritonserver/bin/tritonserver there)" if manifest.get("target") == "ngc" else "")
                              + f"; this server needs --target {' or '.join(targets)}")
    missing = [m for m in manifest.get("models", MODELS) if not (repository / m / "config.pbtxt").is_file()]
    # a unit's files and the manifest key of each one's sha256: the ONNX file (onnxruntime, tensorrt), the engine
    # (tensorrt), or the checkpoint a torch-engine unit runs from (checkpoint.pt / prognosis_checkpoint.pt, no ONNX)
    hashed = {"onnx": "sha256", "checkpoint": "sha256", "plan": "plan_sha256"}
    for unit, entry in manifest.get("units", {}).items():
        if "onnx" not in entry and "checkpoint" not in entry:
            missing.append(f"{unit}'s model file (the manifest names neither an onnx file nor a checkpoint)")
        for key in hashed:
            if key in entry and not (repository / entry[key]).is_file():
                missing.append(entry[key])
    if missing:
        raise RepositoryError(f"{repository} is incomplete (missing {', '.join(missing)}); {rebuild}")
    sums: dict[str, str] = {}   # a checkpoint serves several units: hash it once
    for _unit, entry in manifest.get("units", {}).items():
        for key, sha_key in hashed.items():
            if key in entry and sha_key in entry:
                if entry[key] not in sums:
                    sums[entry[key]] = file_sha256(repository / entry[key])
                if sums[entry[key]] != entry[sha_key]:
                    raise RepositoryError(f"{repository}/{entry[key]} changed since the build; {rebuild}")
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise RepositoryError(f"checkpoint not found: {checkpoint}")
        if file_sha256(checkpoint) != manifest["checkpoint_sha256"]:
            raise RepositoryError(f"{repository} is stale: it was built from another checkpoint than {checkpoint} "
                                  f"(built from {manifest.get('checkpoint')}); {rebuild} --checkpoint {checkpoint}")
    for record in (manifest.get("prognosis"), manifest.get("pemma"), manifest.get("context")):   # other checkpoints
        if record and record.get("source") and Path(record["source"]).is_file():
            if file_sha256(Path(record["source"])) != record["checkpoint_sha256"]:
                raise RepositoryError(f"{repository} is stale: {record['source']} changed since the build; {rebuild}")
    return manifest


def tritonserver_home() -> Path:
    """The tritonserver folder of the nvidia-pytriton wheel (without importing pytriton: it wants numpy<2)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("the Triton server binary comes from the nvidia-pytriton wheel: run `make setup` "
                          "(pip install --no-deps nvidia-pytriton==0.7.0)")
    home = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (home / "bin" / "tritonserver").is_file():
        raise ServerError(f"{home}/bin/tritonserver is missing; reinstall nvidia-pytriton")
    return home


def prepare_server(cache_dir: Path | None = None) -> tuple[Path, Path]:
    """A writable copy of the server with the Python 3.11 stub in backends/python; (binary, backends)."""
    home = tritonserver_home()
    cache_dir = Path(cache_dir or Path(sys.prefix) / "share" / "duplus-tritonserver")
    stamp = cache_dir / ".source"
    if not stamp.is_file() or stamp.read_text() != str(home):
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        shutil.copytree(home, cache_dir, symlinks=True)
        stub = cache_dir / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / \
            "triton_python_backend_stub"
        if not stub.is_file():
            raise ServerError(f"the wheel has no python-backend stub for Python "
                              f"{sys.version_info.major}.{sys.version_info.minor}")
        shutil.copy2(stub, cache_dir / "backends" / "python" / "triton_python_backend_stub")
        stamp.write_text(str(home))
    binary = cache_dir / "bin" / "tritonserver"
    binary.chmod(0o755)
    (cache_dir / "backends" / "python" / "triton_python_backend_stub").chmod(0o755)
    return binary, cache_dir / "backends"


STUB_NUMPY = "numpy==1.26.4"
STUB_SITE_VAR = "DUPLUS_TRITON_STUB_SITE"


def stub_site_packages() -> Path:
    """numpy 1.x for the python-backend stubs only.

    The stub of Triton 2.51 is built against the numpy 1 C API: under numpy 2 every BYTES tensor
    it hands to Python arrives as garbage (seen here: b"\\x02\\x02..." for b"\\x02\\x00\\x00\\x00CT") and the
    stub dies. ``make setup`` installs numpy 1.26.4 into this folder, which goes first on the stubs'
    PYTHONPATH; everything else comes from the project's environment (torch, ONNX Runtime, MONAI and
    SciPy all run on numpy 1.26).
    """
    site = Path(sys.prefix) / "triton-site"
    if not (site / "numpy").is_dir():
        raise ServerError(f"{site} is missing: run `make setup` (pip install --no-deps --target {site} "
                          f"'{STUB_NUMPY}')")
    # the stub's interpreter ignores PYTHONPATH; a .pth hook puts the folder first when the variable is set
    hook = Path(sysconfig.get_paths()["purelib"]) / "duplus_triton_stub.pth"
    line = f'import os, sys; _p = os.environ.get("{STUB_SITE_VAR}"); _p and sys.path.insert(0, _p)\n'
    if not hook.is_file() or hook.read_text() != line:
        hook.write_text(line)
        log.info("wrote %s", hook)
    return site


_HANDED_OUT: set[int] = set()
_PORT_LOCK = threading.Lock()


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux; IANA's 49152-65535 elsewhere)."""
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 49152, 65535


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now, below the kernel's ephemeral range where one fits, never the same twice in a
    process.

    A port the kernel hands out for ``bind(0)`` lies in the ephemeral range, so between this call and the server's
    own bind an outgoing connection of any process (a gRPC client, a health probe) may take it as its local port:
    tritonserver then exits with "Socket ... already in use" (seen once in a full test run, 2026-12-04).  Ports
    from 20000 up to the range's start are not used for outgoing connections.
    """
    import random

    low, _ = _ephemeral_range()
    with _PORT_LOCK:
        if low - 1 > 20000:
            rng = random.Random()
            for _ in range(200):
                port = rng.randint(20000, low - 1)
                if port in _HANDED_OUT:
                    continue
                with socket.socket() as s:
                    try:
                        s.bind((host, port))
                    except OSError:
                        continue
                _HANDED_OUT.add(port)
                return port
        while True:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port


STUB_BINARY = "triton_python_backend_stub"


def python_stubs(server_pid: int, regions: set[str] | None = None) -> dict[str, tuple[int, str]]:
    """The live python-backend stubs of one tritonserver: instance name -> (pid, model).

    A stub's argv is ``triton_python_backend_stub <repo>/<model>/<version>/model.py <shm region> <shm size>
    <shm growth> <parent pid> <backend dir> <ipc handle> <instance name> <runtime dir>``; a zombie is not live.
    ``regions`` collects the stubs' shared-memory region names.
    """
    out: dict[str, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
            if int(stat[1]) != server_pid or stat[0] in ("Z", "X"):
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0")]
        except (OSError, IndexError, ValueError):   # gone meanwhile, or not ours to read
            continue
        if len(argv) > 8 and argv[0].endswith(STUB_BINARY):
            out[argv[8]] = (int(entry), Path(argv[1]).parts[-3])
            if regions is not None:
                regions.add(argv[2])
    return out


@dataclass
class Recovery:
    """One detected stub failure and what the watchdog did about it (``TritonServer.recoveries``)."""

    model: str
    instances: tuple[str, ...]       # the stubs found dead
    detected_at: float               # time.monotonic()
    seconds: float | None = None     # detection -> model READY again (None while in flight or when it failed)
    unload_s: float | None = None
    load_s: float | None = None
    attempts: int = 0
    error: str | None = None


class StubWatchdog(threading.Thread):
    """Reloads a python-backend model whose stub died (see the module docstring).

    Every ``poll_s`` it compares the live stubs with those seen when the model was last ready; a missing
    one marks the model broken (``TritonServer.is_ready()`` is False from then on) and a recovery thread
    unloads it, waits until Triton has let it go, loads it and waits until every served model is READY
    again. A stub that is alive but hung is ``StubProber``'s to find.
    """

    def __init__(self, server: TritonServer, poll_s: float = 0.5, max_attempts: int = 3, unload_wait_s: float = 3.0):
        super().__init__(name="triton-stub-watchdog", daemon=True)
        self.server, self.poll_s, self.max_attempts = server, poll_s, max_attempts
        self.unload_wait_s = unload_wait_s
        self.stuck: set[str] = set()              # models whose dead copy never finished unloading
        self.shm_regions: set[str] = set()        # the stubs' shared-memory regions (freed after a forced stop)
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.expected: dict[str, set[str]] = {}   # model -> its stub instance names when it was last ready
        self.recovering: set[str] = set()
        self.failed: set[str] = set()             # recovery gave up: the launcher is no longer live
        self.recoveries: list[Recovery] = []

    def baseline(self) -> None:
        """Record the stubs of every served model (after the server is ready)."""
        stubs = python_stubs(self.server.process.pid, self.shm_regions)
        with self.lock:
            self.expected = {}
            for instance, (_pid, model) in stubs.items():
                self.expected.setdefault(model, set()).add(instance)
        log.info("watching %d python-backend stubs of %d models", len(stubs), len(self.expected))

    def dead(self) -> dict[str, list[str]]:
        """model -> its stub instances that are gone, for models not being recovered."""
        live = python_stubs(self.server.process.pid)
        with self.lock:
            return {m: sorted(missing) for m, insts in self.expected.items()
                    if m not in self.recovering and (missing := insts - live.keys())}

    def run(self) -> None:
        while not self.stopping.wait(self.poll_s):
            if self.server.process is None or self.server.process.poll() is not None:
                return
            for model, instances in self.dead().items():
                if self.stopping.is_set():
                    return
                rec = Recovery(model, tuple(instances), time.monotonic())
                with self.lock:
                    self.recovering.add(model)
                    self.recoveries.append(rec)
                log.error("python-backend stub %s of model %s is gone (killed or crashed); reloading %s",
                          ", ".join(instances), model, model)
                threading.Thread(target=self.recover, args=(rec,), name=f"recover-{model}", daemon=True).start()

    def recover(self, rec: Recovery) -> None:
        srv = self.server
        try:
            for attempt in range(1, self.max_attempts + 1):
                rec.attempts = attempt
                try:
                    t = time.monotonic()
                    srv.repository_call(rec.model, "unload")
                    try:
                        srv.wait_model_state(rec.model, lambda s: s != "UNLOADING", timeout=self.unload_wait_s)
                    except ServerError:
                        # Triton 2.51 never finishes unloading a python model whose stub died during a request;
                        # a load beside the stuck copy works, and that copy only delays Triton's own exit
                        with self.lock:
                            self.stuck.add(rec.model)
                        log.warning("%s is still unloading after %.0f s (its stub died in a request); loading a "
                                    "new copy beside it", rec.model, self.unload_wait_s)
                    rec.unload_s = time.monotonic() - t
                    t = time.monotonic()
                    srv.repository_call(rec.model, "load")
                    with self.lock:
                        busy = self.recovering - {rec.model}
                    srv.reload_unready(busy)   # an ensemble Triton unloaded with the model and did not load back
                    rec.load_s = time.monotonic() - t
                    break
                except (ServerError, OSError) as exc:
                    rec.error = str(exc)
                    if self.stopping.is_set():
                        return
                    log.error("recovery of %s, attempt %d/%d failed: %s", rec.model, attempt, self.max_attempts, exc)
                    self.stopping.wait(2.0 * attempt)
            else:
                with self.lock:
                    self.failed.add(rec.model)
                log.critical("model %s could not be reloaded after %d attempts; the server is not live",
                             rec.model, self.max_attempts)
                return
            live = python_stubs(srv.process.pid, self.shm_regions)
            with self.lock:
                self.expected[rec.model] = {i for i, (_p, m) in live.items() if m == rec.model}
            rec.seconds, rec.error = time.monotonic() - rec.detected_at, None
            log.warning("model %s recovered in %.1f s (unload %.1f s, load %.1f s, attempt %d)", rec.model,
                        rec.seconds, rec.unload_s, rec.load_s, rec.attempts)
        finally:
            with self.lock:
                self.recovering.discard(rec.model)
                last = not self.recovering
            if last and rec.seconds is not None and not self.stopping.is_set():
                self.refresh_ensembles()

    def refresh_ensembles(self) -> None:
        """Unload and load every served ensemble once no recovery is in flight. Triton loads an ensemble back with
        its reloaded step, but when several steps are reloaded at once (one of them beside a copy stuck in
        unloading) the ensemble can keep a step that returns no output ("expected 2 inputs but got 1")."""
        srv = self.server
        with self.lock:
            self.recovering.add("(ensembles)")
        try:
            for model in srv.served:
                status, body = srv._http(f"/v2/models/{model}/config", timeout=10.0)
                if status == 200 and json.loads(body).get("platform") == "ensemble":
                    t = time.monotonic()
                    srv.repository_call(model, "unload")
                    srv.wait_model_state(model, lambda s: s != "UNLOADING", timeout=10.0)
                    srv.repository_call(model, "load")
                    log.warning("ensemble %s reloaded in %.1f s", model, time.monotonic() - t)
        except (ServerError, OSError, ValueError) as exc:
            log.error("reloading the ensembles failed: %s", exc)
        finally:
            with self.lock:
                self.recovering.discard("(ensembles)")


class StubProber(threading.Thread):
    """Finds python-backend stubs that are alive but no longer healthy, and kills them so the watchdog reloads them.

    A stub that hangs (stopped, deadlocked, starved while holding its health lock) stays a live process,
    and Triton answers every request with ``Stub process '<instance>' is not healthy`` after a 1 s health
    check. Every ``interval_s`` this thread sends each python-backend model a cheap request that reaches
    its stub and is refused there (zero-length dynamic axes, zeros elsewhere: INVALID_ARGUMENT in
    microseconds); ``strikes`` "not healthy" answers in a row, 1 s apart, and the model's stubs get
    SIGKILL, after which ``StubWatchdog`` reloads the model as for any dead stub. A probe that times out
    (the instance busy with a long request) counts as nothing. Off by default in ``TritonServer`` (its
    requests show in the models' statistics), on in the server command (``--probe-s``).
    """

    def __init__(self, server: TritonServer, watchdog: StubWatchdog, interval_s: float = 5.0, strikes: int = 2,
                 timeout_s: float = 10.0):
        super().__init__(name="triton-stub-prober", daemon=True)
        if interval_s <= 0 or strikes < 1:
            raise ValueError(f"interval_s must be > 0 and strikes >= 1, got {interval_s} and {strikes}")
        self.server, self.watchdog = server, watchdog
        self.interval_s, self.strikes, self.timeout_s = interval_s, strikes, timeout_s
        self.killed: list[tuple[str, float]] = []     # (model, time.monotonic()) of every stub killed for hanging
        self.suspects: set[str] = set()               # models whose last probe was answered "not healthy"

    def probe_bodies(self) -> dict[str, bytes]:
        """model -> the JSON body of its probe request, for every served python-backend model."""
        zero = {"BYTES": "", "BOOL": False}
        bodies = {}
        for model in self.server.served:
            status, body = self.server._http(f"/v2/models/{model}/config", timeout=10.0)
            if status != 200 or json.loads(body).get("backend") != "python":
                continue
            status, body = self.server._http(f"/v2/models/{model}", timeout=10.0)
            if status != 200:
                continue
            inputs = []
            for t in json.loads(body).get("inputs", []):
                shape = [0 if int(d) < 0 else int(d) for d in t["shape"]]
                n = 1
                for d in shape:
                    n *= d
                inputs.append({"name": t["name"], "shape": shape, "datatype": t["datatype"],
                               "data": [zero.get(t["datatype"], 0)] * n})
            bodies[model] = json.dumps({"inputs": inputs}).encode()
        return bodies

    def probe(self, model: str, body: bytes) -> str | None:
        """Triton's answer to the probe, or None when there was none in time."""
        request = urllib.request.Request(f"{self.server.http_url}/v2/models/{model}/infer", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as r:
                return r.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.read().decode(errors="replace")
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return None

    def run(self) -> None:
        wd = self.watchdog
        bodies: dict[str, bytes] = {}
        strikes: dict[str, int] = {}
        while not wd.stopping.wait(1.0 if any(strikes.values()) else self.interval_s):
            if self.server.process is None or self.server.process.poll() is not None:
                return
            if not bodies:
                bodies = self.probe_bodies()
            with wd.lock:
                busy = set(wd.recovering)
            for model in busy & set(strikes):       # being reloaded already: its count starts again afterwards
                strikes[model] = 0
                self.suspects.discard(model)
            todo = {m: b for m, b in bodies.items() if m not in busy}
            if not todo or wd.stopping.is_set():
                continue
            # all at once: a probe queued behind a long request (up to timeout_s) delays no other model's
            with concurrent.futures.ThreadPoolExecutor(len(todo), thread_name_prefix="probe") as pool:
                answers = dict(zip(todo, pool.map(lambda item: self.probe(*item), todo.items())))
            for model, answer in answers.items():
                if answer is None or "is not healthy" not in answer:
                    strikes[model] = 0 if answer is not None else strikes.get(model, 0)
                    if answer is not None:
                        self.suspects.discard(model)
                    continue
                strikes[model] = strikes.get(model, 0) + 1
                self.suspects.add(model)
                log.warning("model %s answered a probe with %r (%d/%d)", model, answer[:200], strikes[model],
                            self.strikes)
                if strikes[model] >= self.strikes:
                    pids = [pid for pid, m in python_stubs(self.server.process.pid).values() if m == model]
                    log.error("the python-backend stub of %s is alive but not healthy (pids %s); killing it so that "
                              "it is reloaded", model, pids)
                    for pid in pids:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    self.killed.append((model, time.monotonic()))
                    strikes[model] = 0
                    self.suspects.discard(model)      # the watchdog's recovery keeps readiness down from here


class HealthServer(http.server.ThreadingHTTPServer):
    """``GET /health/live`` and ``GET /health/ready`` of a ``TritonServer``: 200 or 503 with a JSON reason."""

    daemon_threads = True

    def __init__(self, server: TritonServer, address: str, port: int):
        self.triton = server

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                if self.path.rstrip("/") == "/health/ready":
                    state = self.server.triton.health()
                    ok = state["ready"]
                elif self.path.rstrip("/") == "/health/live":
                    state = self.server.triton.health(ready=False)
                    ok = state["live"]
                else:
                    self.send_error(404, "GET /health/live or /health/ready")
                    return
                body = json.dumps(state).encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):   # probes every few seconds: not worth a log line each
                pass

        super().__init__((address, port), Handler)


class TritonServer:
    """The embedded Triton server as a managed subprocess."""

    def __init__(self, repository: str | Path, *, checkpoint: str | Path | None = None, grpc_port: int | None = None,
                 http_port: int | None = None, metrics_port: int | None = None, cache_mb: int = 64,
                 log_file: str | Path | None = None, log_verbose: int = 0, ready_timeout: float = 300.0,
                 models: list[str] | tuple[str, ...] | None = None, health_port: int | None = None,
                 health_address: str = "127.0.0.1", watchdog: bool = True, watchdog_poll_s: float = 0.5,
                 probe_s: float = 0.0, address: str = "127.0.0.1", tritonserver: str | Path | None = None):
        # an object-store repository (s3://, gs://, as://) goes to Triton as it is: the checks of a local
        # repository (manifest, hashes, stale checkpoint) are the build's job there, and every model in it loads
        self.remote = str(repository).startswith(REMOTE_REPOSITORY)
        if self.remote and not tritonserver:
            raise ValueError(f"{repository}: an object-store repository needs a tritonserver built with cloud "
                             "storage support (NVIDIA's container: --tritonserver /opt/tritonserver/bin/tritonserver)")
        self.repository = str(repository) if self.remote else Path(repository).resolve()
        self.manifest = ({"models": with_dependencies(models or MODELS)} if self.remote else
                         check_repository(self.repository, Path(checkpoint) if checkpoint else None,
                                          ("embedded", "ngc") if tritonserver else ("embedded",)))
        # a subset of the repository's models (with what they call) starts faster: each python-backend model
        # costs a stub process and its imports
        built = list(self.manifest.get("models") or MODELS)
        if models is not None:
            unknown = [m for m in models if m not in built]
            if unknown or not models:
                raise ValueError(f"cannot serve {unknown or 'no models'}: the repository {self.repository} has "
                                 f"{built}")
            built = [m for m in with_dependencies(models, built) if m in built]
        self.served = built
        # the ports this launcher picked itself: picked again if tritonserver finds one taken at start
        self._auto_ports = [name for name, given in (("grpc_port", grpc_port), ("http_port", http_port),
                                                     ("metrics_port", metrics_port)) if not given]
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.cache_mb = cache_mb
        # "-": Triton's own log goes to this process's stdout (a container's log)
        self.log_file = Path(log_file) if log_file and str(log_file) != "-" else None
        self.log_to_stdout = str(log_file) == "-"
        self.log_verbose = log_verbose
        self.ready_timeout = ready_timeout
        self.health_port = health_port or free_port()
        self.health_address = health_address
        # where Triton's HTTP, gRPC and metrics endpoints listen (0.0.0.0 in a container); this launcher itself
        # talks to them on loopback unless they listen on one address only
        self.address = address
        self._local = "127.0.0.1" if address in ("0.0.0.0", "127.0.0.1", "localhost") else address
        # a tritonserver binary of its own (NVIDIA's container: /opt/tritonserver/bin/tritonserver) instead of the
        # nvidia-pytriton wheel's copy; its backends/ folder sits beside its bin/
        self.tritonserver = Path(tritonserver) if tritonserver else None
        if self.tritonserver is not None and not self.tritonserver.is_file():
            raise ValueError(f"no tritonserver binary at {self.tritonserver}")
        self.process: subprocess.Popen | None = None
        self._log_handle = None
        self._spawn_args: tuple = ()
        self._respawns = 0
        self.watchdog = StubWatchdog(self, poll_s=watchdog_poll_s) if watchdog else None
        # alive-but-unhealthy stubs (hung): probe requests every probe_s seconds (0: off; needs the watchdog)
        self.prober = StubProber(self, self.watchdog, interval_s=probe_s) if watchdog and probe_s > 0 else None
        self._health: HealthServer | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self._local}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self._local}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._local}:{self.metrics_port}/metrics"

    @property
    def health_url(self) -> str:
        """The launcher's own health endpoint: ``{health_url}/health/ready`` and ``/health/live``."""
        return f"http://{self.health_address}:{self.health_port}"

    @property
    def recoveries(self) -> list[Recovery]:
        """Every stub failure the watchdog detected, with its recovery timings."""
        if self.watchdog is None:
            return []
        with self.watchdog.lock:
            return list(self.watchdog.recoveries)

    def command(self, binary: Path, backends: Path) -> list[str]:
        return [str(binary), f"--model-repository={self.repository}", f"--backend-directory={backends}",
                f"--http-address={self.address}", f"--http-port={self.http_port}",
                f"--grpc-address={self.address}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={self.address}", f"--metrics-port={self.metrics_port}",
                f"--cache-config=local,size={self.cache_mb * 1024 * 1024}", f"--cache-directory={backends.parent / 'caches'}",
                "--exit-on-error=true", "--strict-readiness=true", f"--log-verbose={self.log_verbose}",
                # only the models this build wrote: a checked-in model.py folder without a config (e.g. prognose
                # in a repository built without a prognosis checkpoint) is not a model to load
                "--model-control-mode=explicit", *[f"--load-model={m}" for m in self.models()]]

    def models(self) -> list[str]:
        """The models this server loads."""
        return list(self.served)

    def start(self) -> TritonServer:
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        if self.tritonserver is None:
            binary, backends = prepare_server()
            # auditwheel's rpath points at site-packages/nvidia_pytriton.libs relative to the wheel's own copy
            libs = [str(tritonserver_home().parents[1] / "nvidia_pytriton.libs")]
        else:
            binary, backends, libs = self.tritonserver, self.tritonserver.parents[1] / "backends", []
        # the python-backend stub must load the libpython of this interpreter, not the system's one:
        # a 3.11.2 libpython with a 3.11.7 standard library fails to import _ssl
        if sysconfig.get_config_var("Py_ENABLE_SHARED"):
            libs.insert(0, str(sysconfig.get_config_var("LIBDIR")))
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (*libs, env.get("LD_LIBRARY_PATH", "")) if p)
        if self.tritonserver is None or (Path(sys.prefix) / "triton-site" / "numpy").is_dir():
            env[STUB_SITE_VAR] = str(stub_site_packages())
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self._spawn_args = (env, binary, backends)
        self._respawns = 0
        self._spawn()
        try:
            self._health = HealthServer(self, self.health_address, self.health_port)
            threading.Thread(target=self._health.serve_forever, name="triton-health", daemon=True).start()
            self.wait_ready()
            if self.watchdog is not None:
                self.watchdog.baseline()
                self.watchdog.start()
            if self.prober is not None:
                self.prober.start()
        except BaseException:
            self.stop()
            raise
        log.info("Triton ready: gRPC %s, HTTP %s, metrics %s, health %s/health/ready", self.grpc_url, self.http_url,
                 self.metrics_url, self.health_url)
        return self

    def _spawn(self) -> None:
        env, binary, backends = self._spawn_args
        cmd = self.command(binary, backends)
        log.info("starting %s", " ".join(cmd))
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self.log_file:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = open(self.log_file, "w")
        out = self._log_handle or (None if self.log_to_stdout else subprocess.DEVNULL)
        self.process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def _lost_a_port(self) -> bool:
        """Whether tritonserver, exited before it was ready, found a port this launcher picked taken meanwhile (its
        log says "already in use"); if so, those ports are picked again and the caller starts it again (twice at
        most).  False without a log file to read."""
        if not self._auto_ports or self.log_file is None or self._respawns >= 2:
            return False
        if "already in use" not in self._log_text():
            return False
        self._respawns += 1
        old = {name: getattr(self, name) for name in self._auto_ports}
        for name in self._auto_ports:
            setattr(self, name, free_port())
        log.warning("tritonserver found a port taken at start (%s); starting it again on %s", old,
                    {name: getattr(self, name) for name in self._auto_ports})
        return True

    def _log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def _http(self, path: str, method: str = "GET", timeout: float = 2.0) -> tuple[int, bytes]:
        """(status, body) of a request to Triton's HTTP API; status 0 when it cannot be reached."""
        request = urllib.request.Request(f"{self.http_url}{path}", method=method,
                                         data=b"{}" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return 0, b""

    def model_states(self) -> dict[str, str]:
        """Triton's repository index: model -> READY / UNLOADING / UNAVAILABLE / LOADING (missing: never loaded)."""
        status, body = self._http("/v2/repository/index", "POST", timeout=10.0)
        if status != 200:
            raise ServerError(f"the repository index answered HTTP {status}")
        return {m["name"]: m.get("state", "") for m in json.loads(body)}

    def repository_call(self, model: str, action: str, timeout: float = 300.0) -> None:
        """``POST /v2/repository/models/<model>/<action>`` (load / unload); a refusal is a ServerError."""
        status, body = self._http(f"/v2/repository/models/{model}/{action}", "POST", timeout=timeout)
        if status != 200:
            raise ServerError(f"{action} {model}: HTTP {status} {body[:300].decode(errors='replace')}")

    def wait_model_state(self, model: str, done, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            state = self.model_states().get(model, "")
            if done(state):
                return state
            if time.monotonic() > deadline:
                raise ServerError(f"{model} still {state or 'absent'} after {timeout:.0f} s")
            time.sleep(0.1)

    def reload_unready(self, busy=()) -> None:
        """Load every served model that is not READY and whose dependencies are, skipping ``busy`` models (being
        reloaded by another thread) and those that call them: Triton unloads an ensemble with its step and
        normally loads it back with the step; this catches the case where it did not."""
        for model in self.served:
            states = self.model_states()
            if states.get(model) == "READY" or model in busy:
                continue
            deps = with_dependencies([model], self.served)[:-1]
            if any(d in busy or states.get(d) != "READY" for d in deps):
                continue
            log.warning("loading %s again (%s)", model, states.get(model) or "absent")
            self.repository_call(model, "load")

    def health(self, ready: bool = True) -> dict:
        """{"live", "ready", "reason"}: what the health endpoint answers (``ready=False`` skips the readiness part)."""
        state = {"live": False, "ready": False, "reason": ""}
        if self.process is None or self.process.poll() is not None:
            state["reason"] = "tritonserver is not running"
            return state
        wd = self.watchdog
        failed = sorted(wd.failed) if wd is not None else []
        if failed:
            state["reason"] = f"could not reload {failed}"
            return state
        state["live"] = self._http("/v2/health/live")[0] == 200
        if not state["live"]:
            state["reason"] = "tritonserver is not live"
            return state
        if not ready:
            return state
        if wd is not None:
            with wd.lock:
                recovering = sorted(wd.recovering)
            if recovering:
                state["reason"] = f"reloading {recovering}"
                return state
            dead = wd.dead() if wd.is_alive() else {}
            if dead:
                state["reason"] = f"python-backend stubs gone: {dead}"
                return state
        suspects = sorted(self.prober.suspects) if self.prober is not None else []
        if suspects:
            state["reason"] = f"stubs answering 'not healthy': {suspects}"
            return state
        if self._http("/v2/health/ready")[0] != 200:
            state["reason"] = "tritonserver is not ready"
            return state
        try:
            states = self.model_states()
        except ServerError as exc:
            state["reason"] = str(exc)
            return state
        unready = {m: states.get(m) or "absent" for m in self.served if states.get(m) != "READY"}
        if unready:
            state["reason"] = f"models not ready: {unready}"
            return state
        state["ready"] = True
        return state

    def is_ready(self) -> bool:
        """Triton ready, every served model READY, every python-backend stub alive, no recovery in flight."""
        return self.health()["ready"]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                if self._lost_a_port():
                    self._spawn()
                    continue
                hint = f"; see {self.log_file}" if self.log_file else " (pass --log-file to see why)"
                raise ServerError(f"tritonserver exited with code {self.process.returncode} before it was ready{hint}")
            if self.is_ready():
                return
            time.sleep(0.5)
        raise ServerError(f"tritonserver not ready after {self.ready_timeout:.0f} s")

    def _stop_helpers(self) -> None:
        """The watchdog and prober stop acting, the health endpoint closes."""
        if self.watchdog is not None:
            self.watchdog.stopping.set()
        if self._health is not None:
            self._health.shutdown()
            self._health.server_close()
            self._health = None

    def stop(self, timeout: float = 30.0) -> None:
        self._stop_helpers()
        stuck = sorted(self.watchdog.stuck) if self.watchdog is not None else []
        if stuck:   # Triton would wait its whole exit timeout for those copies
            timeout = min(timeout, 10.0)
        if self.process is not None and self.process.poll() is None:
            log.info("stopping Triton (pid %d)", self.process.pid)
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop in %.0f s%s; killing it", timeout,
                            f" ({stuck} never finished unloading after their stubs died)" if stuck else "")
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
                for region in self.watchdog.shm_regions if self.watchdog is not None else ():
                    Path("/dev/shm", region).unlink(missing_ok=True)
        if self._log_handle:
            self._log_handle.close()
            self._log_handle = None

    def kill(self) -> None:
        """Stop at once: SIGKILL to Triton and its stubs (one process group), then free the stubs' shared memory.
        For a test's teardown, where unloading every model gracefully only costs time (about 1 s per
        python-backend model); ``stop`` is the graceful way."""
        self._stop_helpers()
        if self.process is not None and self.process.poll() is None:
            regions = set(self.watchdog.shm_regions) if self.watchdog is not None else set()
            python_stubs(self.process.pid, regions)
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
            for region in regions:
                Path("/dev/shm", region.lstrip("/")).unlink(missing_ok=True)
        if self._log_handle:
            self._log_handle.close()
            self._log_handle = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serving.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-repository", default="model_repository",
                    help="repository written by `python export/build_engines.py` (embedded flavour; the ngc flavour "
                         "with --tritonserver; s3://, gs:// or as:// URIs with --tritonserver, passed to Triton)")
    ap.add_argument("--checkpoint", default="checkpoints/duplus_demo.pt",
                    help="the checkpoint the repository must have been built from (stale check); '' to skip")
    ap.add_argument("--address", default="127.0.0.1",
                    help="address of Triton's gRPC, HTTP and metrics endpoints (0.0.0.0 in a container)")
    ap.add_argument("--grpc-port", type=int, default=8001, help="gRPC port")
    ap.add_argument("--http-port", type=int, default=8000, help="HTTP port")
    ap.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    ap.add_argument("--tritonserver", default=None, metavar="BINARY",
                    help="a tritonserver binary of its own, e.g. /opt/tritonserver/bin/tritonserver in NVIDIA's "
                         "container (its backends/ beside bin/); default: the nvidia-pytriton wheel's")
    ap.add_argument("--cache-mb", type=int, default=64, help="size of Triton's local response cache (MiB)")
    ap.add_argument("--log-file", default=None,
                    help="write the server's own log here; '-' for this process's stdout (default: discard)")
    ap.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    ap.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for all models to load")
    ap.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                    help="serve only these models and the models they call (e.g. `segment_volume`: faster start, "
                         "less memory); default: every model of the repository")
    ap.add_argument("--health-port", type=int, default=8003,
                    help="port of the launcher's health endpoint: GET /health/ready (200 only when every model is "
                         "ready and no stub is being reloaded) and /health/live")
    ap.add_argument("--health-address", default="127.0.0.1",
                    help="address of the health endpoint (0.0.0.0 for a Kubernetes httpGet probe; it serves only "
                         "the two health paths)")
    ap.add_argument("--no-watchdog", action="store_true",
                    help="do not reload a model whose python-backend stub died")
    ap.add_argument("--probe-s", type=float, default=5.0,
                    help="seconds between probe requests that find stubs alive but not healthy (hung); such a stub "
                         "is killed and its model reloaded; 0 turns probing off")
    ap.add_argument("--log-level", default="INFO", help="logging level of this launcher")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server = TritonServer(args.model_repository, checkpoint=args.checkpoint or None, grpc_port=args.grpc_port,
                              http_port=args.http_port, metrics_port=args.metrics_port, cache_mb=args.cache_mb,
                              log_file=args.log_file, log_verbose=args.log_verbose, ready_timeout=args.ready_timeout,
                              models=args.models, health_port=args.health_port,
                              health_address=args.health_address, watchdog=not args.no_watchdog,
                              probe_s=args.probe_s, address=args.address, tritonserver=args.tritonserver)
    except (RepositoryError, ValueError) as exc:
        log.error("refusing to start: %s", exc)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server.start()
    except ServerError as exc:
        log.error("%s", exc)
        return 1
    log.info("serving %s; Ctrl-C or SIGTERM stops it", server.repository)
    try:
        while not stop.is_set():
            if server.process.poll() is not None:
                log.error("tritonserver exited with code %d", server.process.returncode)
                return 1
            if server.watchdog is not None and server.watchdog.failed:
                log.error("stopping: %s could not be reloaded", sorted(server.watchdog.failed))
                return 1
            stop.wait(1.0)
    finally:
        server.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
