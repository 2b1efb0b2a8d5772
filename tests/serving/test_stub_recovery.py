"""A python-backend stub killed with SIGKILL (what the OOM killer does) is detected and its model reloaded.

One server of its own (killing stubs of the session server would disturb the other tests), serving
``segment_volume`` and ``prognose`` with what they call: nine python-backend stubs, BLS and units. Two waves,
each under the load of a retrying client: the five stubs behind ``segment_volume`` (tokenizer, text_encoder,
conditioning, segmenter, segment_volume) at once, then the four behind ``prognose`` alone
(image_features, text_encoder_ehr, prognosis, prognose). In the first wave three die and two hang instead of
dying (SIGSTOP: alive, but Triton answers "not healthy"); the probe requests find them, kill and reload them.
"""

import os
import signal
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from clients.grpc_client import SegmentationClient
from serving.serve import TritonServer, python_stubs
from tests.conftest import DEMO_CHECKPOINT

pytestmark = pytest.mark.server

VOLUME = np.zeros((40, 40, 30), dtype=np.float32)
AFFINE = np.diag([2.0, 2.0, 2.5, 1.0])
TARGETS = (["liver"], ["spleen"], ["liver", "spleen"], ["left kidney"], ["right kidney"])
PET = np.random.default_rng(3).gamma(2.0, 0.5, (40, 40, 32)).astype(np.float32)
PET_AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])
PROGNOSE_STUBS = {"image_features", "text_encoder_ehr", "prognosis", "prognose"}
RECOVERY_BOUND_S = 30.0


def _health(server) -> int:
    try:
        with urllib.request.urlopen(f"{server.health_url}/health/ready", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@pytest.fixture(scope="module")
def server(triton_repository):
    srv = TritonServer(triton_repository, checkpoint=DEMO_CHECKPOINT, models=["segment_volume", "prognose"],
                       log_file=triton_repository.parent / "triton_recovery.log", probe_s=1.0).start()
    yield srv
    srv.kill()                       # no graceful unload at teardown (tests/clients/test_client.py tests that)


def _segment(client, i):
    # a new T1 per request: the prompt-set LRU of segment_volume misses,
    # so every request reaches the tokenizer and the text encoder too
    res = client.segment_volume(VOLUME, AFFINE, "CT", f"CT of the abdomen, series {i}", TARGETS[i % len(TARGETS)])
    assert res.labels.shape == VOLUME.shape


def _prognose(client, i):
    # a new note per request: every request runs the EHR encoder
    res = client.prognose(PET, PET_AFFINE, "PET", "PET of the head and neck", f"{50 + i % 30}-year-old man, smoker.")
    assert np.isfinite(res.risk)


def _kill(pids):
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def _stop(pids):
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)      # hung: alive, holding nothing, never answering


# wave 1: three stubs behind segment_volume killed, two hung (their processes alive, Triton answering "not
# healthy"); wave 2: the four behind prognose killed. Both mechanisms for BLS and unit stubs in two waves.
WAVES = {
    "segment_volume-stubs": ({"tokenizer": _kill, "conditioning": _kill, "segment_volume": _kill,
                              "text_encoder": _stop, "segmenter": _stop}, _segment),
    "prognose-stubs": ({m: _kill for m in PROGNOSE_STUBS}, _prognose),
}


@pytest.mark.parametrize("wave", list(WAVES))
def test_killed_and_hung_stubs_are_reloaded_while_clients_retry(server, wave):
    """Every stub of the wave killed or hung at once under load: each model back within 30 s, readiness down
    meanwhile, the retrying client sees no error."""
    victims, request_fn = WAVES[wave]
    _outage(server, victims, request_fn)


def _outage(server, victims, request_fn):
    assert server.is_ready() and _health(server) == 200
    before = {inst: (pid, m) for inst, (pid, m) in python_stubs(server.process.pid).items() if m in victims}
    assert {m for _pid, m in before.values()} == set(victims)

    stop = threading.Event()
    done: list[float] = []          # monotonic end time of every successful request
    errors: list[str] = []
    killed_at = float("inf")
    health: list[tuple[float, int]] = []

    def load():
        with SegmentationClient(server.grpc_url, retry_deadline_s=60.0, backoff_s=0.2, max_backoff_s=1.0,
                                timeout_s=60.0) as client:
            i = 0
            while not stop.is_set():
                try:
                    request_fn(client, i)
                    done.append(time.monotonic())
                except BaseException as exc:  # noqa: BLE001 - every failure is a test failure, reported below
                    errors.append(f"{type(exc).__name__} after {time.monotonic() - killed_at:.1f} s: {exc}")
                    return
                i += 1

    def probe():
        while not stop.is_set():
            health.append((time.monotonic(), _health(server)))
            time.sleep(0.1)

    threads = [threading.Thread(target=load), threading.Thread(target=probe)]
    for t in threads:
        t.start()
    while len(done) < 2 and not errors:
        time.sleep(0.1)
    killed_at = time.monotonic()
    for pid, model in before.values():
        victims[model]([pid])

    def recoveries():
        return {r.model: r for r in server.recoveries if r.detected_at >= killed_at}

    try:
        deadline = killed_at + RECOVERY_BOUND_S
        while time.monotonic() < deadline:
            recs = recoveries()
            if set(recs) == set(victims) and all(r.seconds is not None for r in recs.values()) and server.is_ready():
                break
            time.sleep(0.2)
        recovered_at = time.monotonic()
        # requests after the recovery succeed
        while not errors and sum(t > recovered_at for t in done) < 2 and time.monotonic() < recovered_at + 20:
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(120)

    recs = recoveries()
    assert set(recs) == set(victims), recs
    for rec in recs.values():
        # the watchdog polls every 0.5 s; a hung stub needs two "not healthy" probe answers (1 s health check each).
        # A hung stub that held a request when it stopped answers the probes only after Triton failed that
        # request (a probe waits behind it up to the prober's 10 s timeout and counts as nothing): 15.03 s was seen
        # once in CI. Back within 30 s of the kill either way
        assert rec.detected_at - killed_at < (2.0 if victims[rec.model] is _kill else 20.0), rec
        assert rec.seconds is not None and rec.detected_at - killed_at + rec.seconds < RECOVERY_BOUND_S, rec
    assert not errors, errors                           # the client retried through the outage
    assert sum(t > recovered_at for t in done) >= 2
    # readiness went down after the kill and came back; Triton's own readiness is not what reported it
    statuses_after_kill = [s for t, s in health if t > killed_at]
    assert 503 in statuses_after_kill and statuses_after_kill[-1] == 200, statuses_after_kill
    assert server.is_ready()
    after = {inst: v for inst, v in python_stubs(server.process.pid).items() if v[1] in victims}
    assert set(after) == set(before) and not {p for p, _ in after.values()} & {p for p, _ in before.values()}
    print(f"recovered: {({m: round(r.seconds, 1) for m, r in recs.items()})}, "
          f"{len(done)} requests, not ready for {sum(s != 200 for t, s in health if t > killed_at) * 0.1:.1f} s")
