"""The launcher's own ports: picked outside the kernel's range for outgoing connections, never twice, and picked
again when tritonserver finds one taken between the pick and its bind (a full test run lost its session server
that way once, 2026-12-04: "Socket '127.0.0.1:56497' already in use")."""

import socket

import pytest

from serving.serve import TritonServer, _ephemeral_range, free_port
from tests.conftest import DEMO_CHECKPOINT


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    low, _ = _ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    if low > 20001:
        assert all(20000 <= p < low for p in ports), (low, ports)
    for p in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


@pytest.mark.server
def test_a_port_taken_before_tritonserver_binds_it_is_picked_again(triton_repository, caplog):
    srv = TritonServer(triton_repository, checkpoint=DEMO_CHECKPOINT, models=["tokenizer"], watchdog=False,
                       log_file=triton_repository.parent / "triton_ports.log")
    taken = srv.http_port
    with socket.socket() as squatter:         # another process took the picked port meanwhile
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        srv.start()
    try:
        assert srv.http_port != taken and srv.is_ready()
        assert any("found a port taken at start" in r.getMessage() for r in caplog.records)
    finally:
        srv.kill()


def test_only_the_launchers_own_picks_are_picked_again(triton_repository):
    srv = TritonServer(triton_repository, checkpoint=DEMO_CHECKPOINT, models=["tokenizer"], http_port=8000)
    assert srv._auto_ports == ["grpc_port", "metrics_port"] and srv.http_port == 8000
    assert not TritonServer(triton_repository, checkpoint=DEMO_CHECKPOINT, models=["tokenizer"], http_port=8000,
                            grpc_port=8001, metrics_port=8002)._auto_ports
