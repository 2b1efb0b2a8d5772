import os
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = ROOT / "checkpoints" / "duplus_demo.pt"
PROGNOSIS_CHECKPOINT = ROOT / "checkpoints" / "duplus_prognosis.pt"
PEMMA_CHECKPOINT = ROOT / "checkpoints" / "pemma_lora_ms.pt"     # the served default (export/build_engines.py)
#: the shipped context classifier (Biomed-DPT); DUPLUS_CONTEXT_CHECKPOINT points the session builds at another one
#: (e.g. a development checkpoint of python -m training.train_context)
CONTEXT_CHECKPOINT = Path(os.environ.get("DUPLUS_CONTEXT_CHECKPOINT") or ROOT / "checkpoints" / "context_dpt.pt")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, os.cpu_count() or 1))


def cut(image: np.ndarray, affine: np.ndarray, lo, size) -> tuple[np.ndarray, np.ndarray]:
    """``image[lo : lo + size]`` (clipped at the far edge) and the affine that keeps every voxel's world position."""
    lo = np.asarray(lo, dtype=int)
    hi = np.minimum(lo + np.asarray(size, dtype=int), image.shape)
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return np.ascontiguousarray(image[tuple(slice(a, b) for a, b in zip(lo, hi))]), shifted


def tumour_crop(ph, size: tuple[int, int, int], structure: str = "primary tumour"):
    """``ph`` (a phantom) cut to ``size`` voxels centred on ``structure`` (moved inside the volume), with the affine
    that keeps every voxel's world position: a volume of one or two sliding windows in model space, for the tests
    that are about a client, a node or a transport rather than about what a whole volume gives."""
    from types import SimpleNamespace

    centre = np.argwhere(ph.label == ph.label_names.index(structure) + 1).mean(0).round().astype(int)
    size = tuple(min(s, n) for s, n in zip(size, ph.image.shape))     # never more than the volume has
    lo = [int(np.clip(c - s // 2, 0, n - s)) for c, s, n in zip(centre, size, ph.image.shape)]
    image, affine = cut(ph.image, ph.affine, lo, size)
    return SimpleNamespace(image=image, affine=affine, label=cut(ph.label, ph.affine, lo, size)[0],
                           label_names=ph.label_names)


@pytest.fixture(scope="session")
def text_encoder():
    from duplus.text_encoder import TextEncoder

    return TextEncoder()


@pytest.fixture(scope="session")
def demo_predictor():
    from duplus.inference import Predictor

    if not DEMO_CHECKPOINT.is_file():
        pytest.fail(f"the shipped demo checkpoint is missing: {DEMO_CHECKPOINT}")
    return Predictor.from_checkpoint(DEMO_CHECKPOINT)


@pytest.fixture(scope="session")
def triton_repository(tmp_path_factory):
    """The embedded repository built from the shipped checkpoints (ONNX Runtime units, prognosis, PEMMA and the
    context classifier included)."""
    from export.build_engines import build

    for shipped in (PROGNOSIS_CHECKPOINT, PEMMA_CHECKPOINT, CONTEXT_CHECKPOINT):
        if not shipped.is_file():
            pytest.fail(f"a shipped checkpoint is missing: {shipped}")
    out = tmp_path_factory.mktemp("triton") / "model_repository"
    build(DEMO_CHECKPOINT, out, engine="onnxruntime", prognosis_checkpoint=PROGNOSIS_CHECKPOINT,
          pemma_checkpoint=PEMMA_CHECKPOINT, context_checkpoint=CONTEXT_CHECKPOINT)
    return out


@pytest.fixture(scope="session")
def torch_repository(tmp_path_factory):
    """The same checkpoints built with ``--engine torch`` (no ONNX: units run from the copied checkpoints), once."""
    from export.build_engines import build

    out = tmp_path_factory.mktemp("triton_torch") / "model_repository"
    build(DEMO_CHECKPOINT, out, engine="torch", prognosis_checkpoint=PROGNOSIS_CHECKPOINT,
          pemma_checkpoint=PEMMA_CHECKPOINT, context_checkpoint=CONTEXT_CHECKPOINT)
    return out


@pytest.fixture(scope="session")
def triton_server(triton_repository):
    """The real Triton server (nvidia-pytriton's tritonserver) on free loopback ports, for the session."""
    from serving.serve import TritonServer

    srv = TritonServer(triton_repository, checkpoint=DEMO_CHECKPOINT,
                       log_file=triton_repository.parent / "triton.log").start()
    yield srv
    srv.kill()      # no graceful unload of every model at the end (the SIGTERM test in test_client.py covers that)


def _postgres_bindir() -> Path | None:
    """The folder of PostgreSQL's server binaries: initdb on PATH, else Debian's newest /usr/lib/postgresql/N/bin."""
    import shutil

    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl", path=str(Path(found).parent)):
        return Path(found).parent
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                    key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return debian[-1].parent if debian else None


@pytest.fixture(scope="session")
def postgres_url():
    """A throw-away PostgreSQL server for the session: initdb in a temporary folder, 127.0.0.1 on a free port,
    trust authentication, no fsync; yields ``postgresql://postgres@127.0.0.1:PORT/postgres`` and stops the
    server at the end. As root it runs as the ``postgres`` user (initdb refuses root). Skips where there are
    no server binaries (``apt-get install postgresql``). Tests create a database each."""
    import pwd
    import shutil
    import socket
    import subprocess
    import tempfile

    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql (make db-tools)")
    run_as = []
    tmp = Path(tempfile.mkdtemp(prefix="duplus-pg-"))
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(tmp)
            pytest.skip("running as root with no 'postgres' user to run the server as (initdb refuses root)")
        if not shutil.which("runuser"):
            shutil.rmtree(tmp)
            pytest.skip("running as root without runuser (util-linux) to start PostgreSQL as 'postgres'")
        os.chown(tmp, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data, server_log = tmp / "data", tmp / "server.log"

    def run(*cmd):
        proc = subprocess.run([*run_as, *map(str, cmd)], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            log = server_log.read_text()[-2000:] if server_log.exists() else ""
            pytest.fail(f"{Path(str(cmd[0])).name} failed ({proc.returncode}): {proc.stderr[-2000:]}\n{log}")

    try:
        run(bindir / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        run(bindir / "pg_ctl", "-D", data, "-l", server_log, "-w", "-t", "60", "start", "-o",
            f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


# ---- PEMMA: one held-out PET/CT pair, shared by the serving and the DICOM node tests ----

#: a phantom seed used by no training, validation or held-out set of configs/pemma.yaml (3000+, 3100+, 9100+, ...)
PETCT_SEED = 4242


def _crop(image: np.ndarray, affine: np.ndarray, centre_vox, size) -> tuple[np.ndarray, np.ndarray]:
    """A sub-volume of ``size`` voxels around ``centre_vox`` and its affine (same world positions)."""
    return cut(image, affine, np.clip(np.round(np.asarray(centre_vox) - np.asarray(size) / 2).astype(int), 0, None),
               size)


@pytest.fixture(scope="session")
def petct_pair():
    """(ct, ct_affine, pet, pet_affine): a CT of ~135 x 70 x 70 mm and a PET of ~150 x 90 x 75 mm around the lesions."""
    from duplus.synth.phantoms import generate_petct

    p = generate_petct("E", PETCT_SEED)
    centre_world = p.ct.affine @ np.r_[np.argwhere(p.label > 0).mean(axis=0), 1.0]
    ct, ct_affine = _crop(p.ct.image, p.ct.affine, np.argwhere(p.label > 0).mean(axis=0),
                          np.round(np.array([135.0, 70.0, 70.0]) / np.linalg.norm(p.ct.affine[:3, :3], axis=0)))
    pet_centre = np.linalg.solve(p.pet.affine, centre_world)[:3]
    pet, pet_affine = _crop(p.pet.image, p.pet.affine, pet_centre,
                            np.round(np.array([150.0, 90.0, 75.0]) / np.linalg.norm(p.pet.affine[:3, :3], axis=0)))
    return ct.astype(np.float32), ct_affine, pet.astype(np.float32), pet_affine
