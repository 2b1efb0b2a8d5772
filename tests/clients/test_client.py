"""The gRPC client library against the real server: shared memory == plain gRPC, timeouts, retries on
UNAVAILABLE only (a server restart mid-batch), the contract check, asyncio with cancellation."""

import asyncio
import logging
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from clients.grpc_client import (
    AsyncSegmentationClient,
    RequestTimeout,
    SegmentationClient,
    ServerMismatchError,
    _check_metadata,
)
from duplus.synth.phantoms import AcquisitionSpec, generate_phantom
from serving.serve import TritonServer, free_port
from tests.conftest import DEMO_CHECKPOINT, ROOT, tumour_crop

pytestmark = pytest.mark.server
T1, TARGETS = "CT of the head and neck", ["primary tumour", "lymph node"]


@pytest.fixture(scope="module")
def small_ct():
    """A permuted, flipped 3 mm head-and-neck CT cut to 144 x 144 x 108 mm around its primary tumour: two
    sliding windows in model space (the whole phantom takes twelve, about 6 s a request on 2 cores). These
    tests are about the client; what a whole volume gives is tested in tests/serving/test_triton_server.py."""
    acq = AcquisitionSpec(spacing=(3.0, 3.0, 3.0), axis_order=(1, 0, 2), flips=(True, False, True), noise=1.0)
    return tumour_crop(generate_phantom("head_neck", "CT", 464646, acquisition=acq), (48, 48, 36))


def test_retry_backoff_doubles_up_to_its_cap_and_bad_settings_are_named():
    """No server: the waits between retries on UNAVAILABLE double from backoff_s and stop at max_backoff_s."""
    unavailable = InferenceServerException("failed to connect to all addresses", status="StatusCode.UNAVAILABLE")
    with SegmentationClient("127.0.0.1:1", backoff_s=0.5, max_backoff_s=3.0, retry_deadline_s=60) as client:
        assert [client._retryable(unavailable, time.monotonic(), a) for a in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
        assert client._retryable(unavailable, time.monotonic() - 61, 0) is None      # past retry_deadline_s
        bad = InferenceServerException("unknown target prompt", status="StatusCode.INVALID_ARGUMENT")
        assert client._retryable(bad, time.monotonic(), 0) is None
    for kw in ({"backoff_s": 5.0, "max_backoff_s": 1.0}, {"backoff_s": -1.0}):
        with pytest.raises(ValueError, match="backoff_s must be >= 0 and <= max_backoff_s"):
            SegmentationClient("127.0.0.1:1", **kw)
    with pytest.raises(ValueError, match="max_backoff_s"):
        AsyncSegmentationClient("127.0.0.1:1", backoff_s=2.0, max_backoff_s=1.0)


def test_shared_memory_equals_plain_grpc(triton_server, small_ct):
    with SegmentationClient(triton_server.grpc_url) as plain, \
            SegmentationClient(triton_server.grpc_url, shared_memory="system") as shm:
        plain.check_ready()
        a = plain.segment_volume(small_ct.image, small_ct.affine, "CT", T1, TARGETS)
        b = shm.segment_volume(small_ct.image, small_ct.affine, "CT", T1, TARGETS)
    assert a.labels.shape == small_ct.image.shape and a.labels.dtype == np.uint8
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.resolved == b.resolved == tuple(TARGETS)
    assert (a.labels == 1).sum() > 0


def _cuda_ready() -> str | None:
    try:
        import tritonclient.utils.cuda_shared_memory  # noqa: F401
    except (ImportError, RuntimeError) as exc:
        return f"CUDA shared memory unavailable: {exc}"
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU on this machine"


def test_cuda_shared_memory_is_refused_clearly_without_cuda_or_equals_plain(triton_server, small_ct):
    reason = _cuda_ready()
    if reason is not None:
        if "unavailable" in reason:  # no cuda-python: the client says what is missing instead of failing later
            with pytest.raises(ValueError, match="shared_memory='cuda' needs"):
                SegmentationClient(triton_server.grpc_url, shared_memory="cuda")
        pytest.skip(f"{reason}: CUDA shared memory needs a GPU shared by client and server")
    with SegmentationClient(triton_server.grpc_url) as plain, \
            SegmentationClient(triton_server.grpc_url, shared_memory="cuda") as cuda:
        a = plain.segment_volume(small_ct.image, small_ct.affine, "CT", T1, TARGETS)
        b = cuda.segment_volume(small_ct.image, small_ct.affine, "CT", T1, TARGETS)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_timeout_is_a_clear_error_and_invalid_argument_is_not_retried(triton_server, small_ct, caplog):
    with SegmentationClient(triton_server.grpc_url, timeout_s=0.05) as fast:
        with pytest.raises(RequestTimeout, match="did not answer within 0.1 s"):
            fast.segment_volume(small_ct.image, small_ct.affine, "CT", T1, TARGETS)
    # the server may still be finishing the timed-out request, so "not retried" is read off the client's retry
    # log, not off a wall-clock bound (a slow CI machine took 10.8 s here while answering at the first attempt)
    with SegmentationClient(triton_server.grpc_url, retry_deadline_s=60, backoff_s=0.5) as client:
        with caplog.at_level(logging.WARNING, logger="clients.grpc_client"):
            with pytest.raises(InferenceServerException, match="banana") as err:
                client.segment_volume(small_ct.image, small_ct.affine, "CT", T1, ["banana"])
        assert "INVALID_ARGUMENT" in str(err.value.status())
        assert "server unavailable" not in caplog.text and "retry" not in caplog.text, caplog.text
        assert client.segment_volume(small_ct.image, small_ct.affine, "CT", T1, TARGETS).labels.any()


def test_contract_check_names_the_difference(triton_server):
    with SegmentationClient(triton_server.grpc_url) as client:
        meta = client.client.get_model_metadata("segment_volume", as_json=True)
    _check_metadata(meta)
    meta["inputs"] = [t for t in meta["inputs"] if t["name"] != "AFFINE"]
    meta["outputs"][0]["datatype"] = "INT32"
    with pytest.raises(ServerMismatchError, match="input AFFINE missing.*output LABELS is INT32"):
        _check_metadata(meta)
    with pytest.raises(ValueError, match="on this host"):
        SegmentationClient("10.1.2.3:8001", shared_memory="system")


def test_asyncio_concurrent_calls_and_cancellation(triton_server, small_ct):
    async def go():
        async with AsyncSegmentationClient(triton_server.grpc_url) as client:
            await client.check_ready()
            a, b = await asyncio.gather(*(client.segment_volume(small_ct.image, small_ct.affine, "CT", T1, TARGETS)
                                          for _ in range(2)))
            # cancelled while in flight (the server finishes it regardless: a whole abdomen here cost a minute)
            task = asyncio.create_task(client.segment_volume(small_ct.image, small_ct.affine, "CT", T1,
                                                             ["primary tumour"]))
            await asyncio.sleep(0.3)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            c = await client.segment_volume(small_ct.image, small_ct.affine, "CT", T1, TARGETS)
            return a, b, c

    a, b, c = asyncio.run(go())
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.labels, c.labels)


def test_server_restart_mid_batch_is_retried_and_the_command_stops_cleanly(triton_repository, small_ct, caplog):
    """`python -m serving.serve` (segment_volume and what it calls) serves a batch; SIGTERM mid-batch -> exit 0,
    "stopped", ports free; the server returns (TritonServer on the same ports) and the client's retries on
    UNAVAILABLE finish the batch with the same labels. One server start fewer than testing the two apart."""
    ports = dict(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    proc = subprocess.Popen([sys.executable, "-m", "serving.serve", "--model-repository", str(triton_repository),
                             "--checkpoint", str(DEMO_CHECKPOINT), "--grpc-port", str(ports["grpc_port"]),
                             "--http-port", str(ports["http_port"]), "--metrics-port", str(ports["metrics_port"]),
                             "--models", "segment_volume"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"127.0.0.1:{ports['grpc_port']}"
    results, errors = [], []
    first_done = threading.Event()
    server = None

    def batch():
        # backoff capped at 1 s: the batch goes on within a second of the server's return, not up to 10 s later
        with SegmentationClient(url, retry_deadline_s=240, backoff_s=0.5, max_backoff_s=1.0) as client:
            for _ in range(3):
                try:
                    results.append(client.segment_volume(small_ct.image, small_ct.affine, "CT", T1, TARGETS))
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)
                first_done.set()

    try:
        probe = grpcclient.InferenceServerClient(url)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if probe.is_server_ready():
                    break
            except InferenceServerException:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        assert probe.is_model_ready("segment_volume") and probe.is_model_ready("segmenter")
        assert not probe.is_model_ready("prognose")   # --models: only segment_volume and what it calls
        with caplog.at_level(logging.WARNING, logger="clients.grpc_client"):
            worker = threading.Thread(target=batch)
            worker.start()
            assert first_done.wait(120)
            proc.send_signal(signal.SIGTERM)          # the server goes away mid-batch ...
            assert proc.wait(timeout=90) == 0
            out = proc.stdout.read()
            assert "stopped" in out
            with pytest.raises(InferenceServerException):
                probe.is_server_ready()
            server = TritonServer(triton_repository, checkpoint=DEMO_CHECKPOINT, models=["segment_volume"],
                                  **ports).start()   # ... and returns on the same ports
            worker.join(300)
    finally:
        if proc.poll() is None:
            proc.kill()
        if server is not None:
            server.kill()                          # the graceful stop was the command's, above
    assert not errors, [(e.status(), e.message()) if hasattr(e, "status") else repr(e) for e in errors]
    assert len(results) == 3
    for r in results[1:]:
        np.testing.assert_array_equal(r.labels, results[0].labels)
    assert "server unavailable" in caplog.text   # the client did retry (the --models refusal: test_triton_server)
