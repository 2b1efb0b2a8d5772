"""The client over several Triton replicas: round robin over those that are up, a dead one skipped after its
first failure (the request goes on to the next one at once), counts per replica. Against the session server;
a replica killed in the middle of a request is the chaos test's (tests/scale)."""

from __future__ import annotations

import numpy as np
import pytest

from clients.grpc_client import SegmentationClient, replica_urls
from serving.serve import free_port

VOLUME = np.zeros((40, 40, 30), dtype=np.float32)
AFFINE = np.diag([2.0, 2.0, 2.5, 1.0])


def test_replica_urls():
    assert replica_urls("a:1") == ("a:1",)
    assert replica_urls("a:1, b:2") == ("a:1", "b:2")
    assert replica_urls(["a:1", "b:2"]) == ("a:1", "b:2")
    assert replica_urls("dns:///triton-headless:8001") == ("dns:///triton-headless:8001",)
    assert replica_urls("ipv4:10.0.0.1:8001,10.0.0.2:8001") == ("ipv4:10.0.0.1:8001,10.0.0.2:8001",)
    for bad in ("", [], ["a:1", "a:1"], " , "):
        with pytest.raises(ValueError):
            replica_urls(bad)


def _segment(client, i):
    res = client.segment_volume(VOLUME, AFFINE, "CT", "CT of the abdomen", ["liver"] if i % 2 else ["spleen"])
    assert res.labels.shape == VOLUME.shape
    return res


@pytest.mark.server
def test_round_robin_over_replicas(triton_server):
    port = triton_server.grpc_port
    urls = [f"127.0.0.1:{port}", f"localhost:{port}"]      # two names of one server: two channels, two replicas
    seen = []
    with SegmentationClient(urls, observer=lambda url, outcome, s: seen.append((url, outcome))) as client:
        client.check_ready()
        for i in range(4):
            _segment(client, i)
        stats = client.replica_stats()
    assert [s.requests for s in stats.values()] == [2, 2]
    order = [u for u, _ in seen]
    assert order[0] != order[1] and order[:2] == order[2:] and {o for _, o in seen} == {"ok"}   # in turn


@pytest.mark.server
def test_dead_replica_is_skipped_and_named(triton_server):
    dead = f"127.0.0.1:{free_port()}"                      # nothing listens there
    live = triton_server.grpc_url
    seen = []
    with SegmentationClient([dead, live], down_s=60.0, retry_deadline_s=5.0,
                            observer=lambda url, outcome, s: seen.append((url, outcome))) as client:
        with pytest.raises(ConnectionError, match=dead):
            client.check_ready()
        for i in range(4):
            _segment(client, i)                             # never an error: the dead replica fails over at once
        stats = client.replica_stats()
    # round robin reaches the dead replica by the second request at the latest; tried once, then skipped for down_s
    assert stats[dead].requests == 1 and stats[dead].failures == 1 and stats[dead].down_until > 0
    assert stats[live].requests == 4 and stats[live].failures == 0
    assert [o for u, o in seen if u == dead] == ["failed"] and [o for u, o in seen if u == live] == ["ok"] * 4


@pytest.mark.server
def test_grpc_round_robin_name(triton_server):
    # one gRPC name with its own load balancing (a Kubernetes headless service resolves to every pod)
    with SegmentationClient(f"ipv4:127.0.0.1:{triton_server.grpc_port}") as client:
        assert ("grpc.lb_policy_name", "round_robin") in client.channel_args
        _segment(client, 0)


@pytest.mark.server
def test_bad_request_is_not_failed_over(triton_server):
    port = triton_server.grpc_port
    from tritonclient.utils import InferenceServerException

    with SegmentationClient([f"127.0.0.1:{port}", f"localhost:{port}"]) as client:
        with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT|unknown|no target"):
            client.segment_volume(VOLUME, AFFINE, "CT", "CT of the abdomen", ["the moon"])
        stats = client.replica_stats()
    assert sum(s.requests for s in stats.values()) == 1 and sum(s.failures for s in stats.values()) == 0
