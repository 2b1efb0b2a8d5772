"""Start the embedded Triton server (from the nvidia-pytriton wheel) on a generated repository.

    python -m serving.serve --model-repository model_repository --checkpoint checkpoints/duplus_demo.pt

It refuses to start, with a message saying what to do, when the repository is missing, incomplete,
of the ngc flavour, or stale (built from another checkpoint than ``--checkpoint``). It binds
HTTP, gRPC and metrics to loopback, waits until every model is ready, and stops the server
cleanly on SIGINT/SIGTERM. ``TritonServer`` is the same thing as a context manager for tests,
the demo and the benchmarks.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from duplus.files import file_sha256  # noqa: E402

log = logging.getLogger("serve")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODELS = ("tokenizer", "text_encoder", "conditioning", "segmenter", "encode_prompts", "segment_patch",
          "segment_volume")
# what each model calls (ensemble steps and BLS requests, see export/triton_config.py and serving/triton_models.py):
# serving a subset loads these with it
MODEL_DEPENDENCIES = {
    "encode_prompts": ("tokenizer", "text_encoder", "conditioning"),
    "segment_patch": ("tokenizer", "text_encoder", "conditioning", "segmenter"),
    "segment_volume": ("encode_prompts", "segmenter"),
    "prognose": ("encode_prompts", "image_features", "text_encoder_ehr", "prognosis"),
}


def with_dependencies(models) -> list[str]:
    """``models`` and everything they call, each once, dependencies first."""
    out: list[str] = []

    def add(name: str) -> None:
        for dep in MODEL_DEPENDENCIES.get(name, ()):
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


def check_repository(repository: Path, checkpoint: Path | None = None) -> dict:
    """The repository's manifest, after checking it is complete, embedded and built from ``checkpoint``."""
    repository = Path(repository)
    rebuild = f"rebuild it with `python export/build_engines.py --output {repository}`"
    manifest_path = repository / "manifest.json"
    if not manifest_path.is_file():
        raise RepositoryError(f"no model repository at {repository} (manifest.json missing); {rebuild}")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("target", "embedded") != "embedded":
        raise RepositoryError(f"{repository} is the {manifest.get('target')} flavour, for the NGC Triton container; "
                              "this server needs --target embedded")
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
    prognosis = manifest.get("prognosis")
    if prognosis and prognosis.get("source") and Path(prognosis["source"]).is_file():
        if file_sha256(Path(prognosis["source"])) != prognosis["checkpoint_sha256"]:
            raise RepositoryError(f"{repository} is stale: {prognosis['source']} changed since the build; {rebuild}")
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """The embedded Triton server as a managed subprocess."""

    def __init__(self, repository: str | Path, *, checkpoint: str | Path | None = None, grpc_port: int | None = None,
                 http_port: int | None = None, metrics_port: int | None = None, cache_mb: int = 64,
                 log_file: str | Path | None = None, log_verbose: int = 0, ready_timeout: float = 300.0,
                 models: list[str] | tuple[str, ...] | None = None):
        self.repository = Path(repository).resolve()
        self.manifest = check_repository(self.repository, Path(checkpoint) if checkpoint else None)
        # a subset of the repository's models (with what they call) starts faster: each python-backend model
        # costs a stub process and its imports
        built = list(self.manifest.get("models") or MODELS)
        if models is not None:
            unknown = [m for m in models if m not in built]
            if unknown or not models:
                raise ValueError(f"cannot serve {unknown or 'no models'}: the repository {self.repository} has "
                                 f"{built}")
            built = [m for m in with_dependencies(models) if m in built]
        self.served = built
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.cache_mb = cache_mb
        self.log_file = Path(log_file) if log_file else None
        self.log_verbose = log_verbose
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen | None = None
        self._log_handle = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self, binary: Path, backends: Path) -> list[str]:
        return [str(binary), f"--model-repository={self.repository}", f"--backend-directory={backends}",
                "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
                f"--cache-config=local,size={self.cache_mb * 1024 * 1024}", f"--cache-directory={backends.parent / 'caches'}",
                "--exit-on-error=true", "--strict-readiness=true", f"--log-verbose={self.log_verbose}",
                # only the models this build wrote: a checked-in model.py folder without a config (e.g. prognose
                # in a repository built without a prognosis checkpoint) is not a model to load
                "--model-control-mode=explicit", *[f"--load-model={m}" for m in self.models()]]

    def models(self) -> list[str]:
        """The models this server loads."""
        return list(self.served)

    def start(self) -> TritonServer:
        binary, backends = prepare_server()
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        # auditwheel's rpath points at site-packages/nvidia_pytriton.libs relative to the wheel's own copy
        libs = [str(tritonserver_home().parents[1] / "nvidia_pytriton.libs")]
        # the python-backend stub must load the libpython of this interpreter, not the system's one:
        # a 3.11.2 libpython with a 3.11.7 standard library fails to import _ssl
        if sysconfig.get_config_var("Py_ENABLE_SHARED"):
            libs.insert(0, str(sysconfig.get_config_var("LIBDIR")))
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (*libs, env.get("LD_LIBRARY_PATH", "")) if p)
        env[STUB_SITE_VAR] = str(stub_site_packages())
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        cmd = self.command(binary, backends)
        log.info("starting %s", " ".join(cmd))
        if self.log_file:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = open(self.log_file, "w")
        out = self._log_handle or subprocess.DEVNULL
        self.process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("Triton ready: gRPC %s, HTTP %s, metrics %s", self.grpc_url, self.http_url, self.metrics_url)
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                hint = f"; see {self.log_file}" if self.log_file else " (pass --log-file to see why)"
                raise ServerError(f"tritonserver exited with code {self.process.returncode} before it was ready{hint}")
            if self.is_ready():
                return
            time.sleep(0.5)
        raise ServerError(f"tritonserver not ready after {self.ready_timeout:.0f} s")

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            log.info("stopping Triton (pid %d)", self.process.pid)
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop in %.0f s; killing it", timeout)
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
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
                    help="repository written by `python export/build_engines.py` (embedded flavour)")
    ap.add_argument("--checkpoint", default="checkpoints/duplus_demo.pt",
                    help="the checkpoint the repository must have been built from (stale check); '' to skip")
    ap.add_argument("--grpc-port", type=int, default=8001, help="gRPC port on 127.0.0.1")
    ap.add_argument("--http-port", type=int, default=8000, help="HTTP port on 127.0.0.1")
    ap.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port on 127.0.0.1")
    ap.add_argument("--cache-mb", type=int, default=64, help="size of Triton's local response cache (MiB)")
    ap.add_argument("--log-file", default=None, help="write the server's own log here (default: discard)")
    ap.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    ap.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for all models to load")
    ap.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                    help="serve only these models and the models they call (e.g. `segment_volume`: faster start, "
                         "less memory); default: every model of the repository")
    ap.add_argument("--log-level", default="INFO", help="logging level of this launcher")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server = TritonServer(args.model_repository, checkpoint=args.checkpoint or None, grpc_port=args.grpc_port,
                              http_port=args.http_port, metrics_port=args.metrics_port, cache_mb=args.cache_mb,
                              log_file=args.log_file, log_verbose=args.log_verbose, ready_timeout=args.ready_timeout,
                              models=args.models)
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
            stop.wait(1.0)
    finally:
        server.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
