"""The launcher's options for a container (no server started): NVIDIA's tritonserver binary, the ngc flavour,
an object-store repository passed through to Triton, endpoints on every address, Triton's log on stdout."""

import json

import pytest

from serving.serve import RepositoryError, TritonServer, check_repository, main


@pytest.fixture
def binary(tmp_path):
    b = tmp_path / "opt" / "tritonserver" / "bin" / "tritonserver"
    b.parent.mkdir(parents=True)
    b.write_text("#!/bin/sh\n")
    return b


def test_object_store_repository_goes_to_triton_as_is(binary):
    srv = TritonServer("s3://bucket/duplus/model_repository", tritonserver=binary, models=["segment_volume"],
                       address="0.0.0.0", log_file="-")
    cmd = srv.command(binary, binary.parents[1] / "backends")
    assert "--model-repository=s3://bucket/duplus/model_repository" in cmd
    assert {"--grpc-address=0.0.0.0", "--http-address=0.0.0.0", "--metrics-address=0.0.0.0"} <= set(cmd)
    assert [c for c in cmd if c.startswith("--load-model=")] == [
        f"--load-model={m}" for m in ("tokenizer", "text_encoder", "conditioning", "encode_prompts", "instructions",
                                      "encode_instructions", "segmenter", "segment_volume")]
    assert srv.grpc_url.startswith("127.0.0.1:") and srv.log_file is None and srv.log_to_stdout


def test_object_store_needs_a_cloud_capable_binary():
    with pytest.raises(ValueError, match="object-store repository needs a tritonserver"):
        TritonServer("gs://bucket/repo")


def test_ngc_flavour_only_with_its_own_binary(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"target": "ngc", "models": []}))
    with pytest.raises(RepositoryError, match="ngc flavour.*--tritonserver"):
        check_repository(tmp_path)
    assert check_repository(tmp_path, targets=("embedded", "ngc"))["target"] == "ngc"


def test_missing_binary_is_named(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"target": "ngc", "models": []}))
    assert main(["--model-repository", str(tmp_path), "--checkpoint", "",
                 "--tritonserver", str(tmp_path / "nope")]) == 2
