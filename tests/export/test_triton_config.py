"""Both repository flavours: every config.pbtxt parses with Triton's own protobuf schema and agrees
with the exported ONNX files, and every ensemble is a well-typed graph."""

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from duplus.contract import ServingLimits
from duplus.models.duplus import DuPLUS, DuPLUSConfig
from duplus.vocabulary import PromptVocabulary
from export.build_engines import build
from export.triton_config import InstanceGroup, ModelConfig, RepositoryOptions, TritonTensor, parse_pbtxt

SMALL = DuPLUSConfig(channels=(4, 8, 16), patch_size=(32, 32, 16), film_hidden=32, controller_hidden=32,
                     head_channels=4, head_levels=2)
ONNX_TYPES = {onnx.TensorProto.FLOAT: pb.TYPE_FP32, onnx.TensorProto.INT64: pb.TYPE_INT64,
              onnx.TensorProto.UINT8: pb.TYPE_UINT8}
MODELS = {"instructions", "tokenizer", "text_encoder", "conditioning", "segmenter", "encode_prompts",
          "encode_instructions", "segment_patch", "segment_volume"}


@pytest.fixture(scope="module")
def repositories(tmp_path_factory):
    root = tmp_path_factory.mktemp("repos")
    torch.manual_seed(0)
    ckpt = root / "small.pt"
    torch.save({"model_config": SMALL.to_dict(), "state_dict": DuPLUS(SMALL).state_dict(),
                "vocabulary": PromptVocabulary().to_dict()}, ckpt)
    build(ckpt, root / "embedded", target="embedded", engine="onnxruntime")
    build(ckpt, root / "ngc", target="ngc", engine="onnxruntime")
    return {"embedded": root / "embedded", "ngc": root / "ngc"}


def _configs(repo):
    return {p.parent.name: parse_pbtxt(p.read_text()) for p in repo.glob("*/config.pbtxt")}


@pytest.mark.parametrize("flavour", ["embedded", "ngc"])
def test_every_config_parses_and_matches_the_onnx_files(repositories, flavour):
    repo = repositories[flavour]
    configs = _configs(repo)
    assert set(configs) == MODELS
    for name in ("text_encoder", "conditioning", "segmenter"):
        cfg = configs[name]
        if flavour == "ngc":
            assert cfg.platform == "onnxruntime_onnx" and cfg.default_model_filename == "model.onnx"
            assert not (repo / name / "1" / "model.py").exists()
        else:
            assert cfg.backend == "python" and (repo / name / "1" / "model.py").is_file()
        graph = onnx.load(str(repo / name / "1" / "model.onnx")).graph
        for tensors, values in ((cfg.input, graph.input), (cfg.output, graph.output)):
            assert [t.name for t in tensors] == [v.name for v in values], name
            for t, v in zip(tensors, values):
                assert ONNX_TYPES[v.type.tensor_type.elem_type] == t.data_type, (name, t.name)
                onnx_dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
                # Triton's rule: a dynamic model axis accepts any config dim, a fixed one must be equal
                assert len(t.dims) == len(onnx_dims), (name, t.name)
                assert all(m in (-1, c) for c, m in zip(t.dims, onnx_dims)), (name, t.name, list(t.dims), onnx_dims)
        assert cfg.max_batch_size == 0  # K targets and windows are not a batch axis Triton may split
    for name in ("instructions", "tokenizer", "segment_volume"):
        assert configs[name].backend == "python" and (repo / name / "1" / "model.py").is_file()
    # INSTRUCTIONS, CONTEXT and STRICT_CONTEXT are optional inputs of segment_volume: clients that send names only
    # are unchanged; CONTEXT_VERDICT is an output even without a context classifier (the verdict then says so)
    optional = {t.name for t in configs["segment_volume"].input if t.optional}
    assert optional == {"INSTRUCTIONS", "CONTEXT", "STRICT_CONTEXT"}
    assert "CONTEXT_VERDICT" in [t.name for t in configs["segment_volume"].output]
    # the response cache only on native units: Triton 2.51 caches a python-backend error response as an empty success
    cached = flavour == "ngc"
    assert configs["text_encoder"].response_cache.enable == cached and configs["conditioning"].response_cache.enable == cached
    assert configs["segmenter"].model_warmup and configs["segmenter"].instance_group[0].count >= 1


@pytest.mark.parametrize("flavour", ["embedded", "ngc"])
def test_ensembles_are_well_typed_graphs(repositories, flavour):
    configs = _configs(repositories[flavour])
    for name in ("encode_prompts", "encode_instructions", "segment_patch"):
        ens = configs[name]
        assert ens.platform == "ensemble"
        known = {t.name: (t.data_type, len(t.dims)) for t in ens.input}
        for step in ens.ensemble_scheduling.step:
            model = configs[step.model_name]
            inputs = {t.name: (t.data_type, len(t.dims)) for t in model.input}
            outputs = {t.name: (t.data_type, len(t.dims)) for t in model.output}
            assert set(step.input_map) == {t.name for t in model.input if not t.optional}, (name, step.model_name)
            for model_input, tensor in step.input_map.items():
                assert tensor in known, f"{name}: {tensor} used before it is produced"
                assert known[tensor] == inputs[model_input], (name, tensor)
            for model_output, tensor in step.output_map.items():
                assert model_output in outputs, (name, step.model_name, model_output)
                known[tensor] = outputs[model_output]
        for out in ens.output:
            assert known.get(out.name) == (out.data_type, len(out.dims)), (name, out.name)


def test_manifest_and_serving_assets(repositories):
    import json

    repo = repositories["embedded"]
    manifest = json.loads((repo / "manifest.json").read_text())
    assert manifest["target"] == "embedded" and len(manifest["checkpoint_sha256"]) == 64
    with np.load(repo / "segment_volume" / "1" / "known_targets.npz") as z:
        assert z["embeddings"].shape == (len(z["names"]), 384)
        np.testing.assert_allclose(np.linalg.norm(z["embeddings"], axis=1), 1.0, atol=1e-5)
    assert (repo / "tokenizer" / "1" / "tokenizer" / "tokenizer.json").is_file()
    from duplus.instructions import GeneratorConfig

    assert GeneratorConfig.from_yaml(repo / "instructions" / "1" / "generator.yaml").backend == "knowledge_base"
    params = dict((k, v.string_value) for k, v in _configs(repo)["segment_volume"].parameters.items())
    assert ServingLimits.from_parameters(params) == ServingLimits(max_targets=16, sw_batch_size=4)


def test_typed_objects_reject_bad_configs():
    with pytest.raises(ValueError, match="dims"):
        TritonTensor("x", "float32", (0, 3))
    with pytest.raises(ValueError, match="dtype"):
        TritonTensor("x", "complex64", (3,))
    with pytest.raises(ValueError, match="kind"):
        InstanceGroup(1, "KIND_TPU")
    with pytest.raises(ValueError, match="duplicate"):
        ModelConfig("m", (TritonTensor("a", "float32", (1,)),), (TritonTensor("a", "float32", (1,)),), backend="python")
    with pytest.raises(ValueError, match="ngc"):
        RepositoryOptions(flavour="ngc", engine="torch")
    with pytest.raises(ValueError, match="overlap"):
        ServingLimits(overlap=1.0)
    with pytest.raises(text_format.ParseError):  # Triton's schema refuses an unknown field
        parse_pbtxt('name: "m"\nbackend: "python"\nno_such_field: 3\n')


def test_ngc_flavour_refuses_the_source_folder(repositories, tmp_path):
    from export.build_engines import SOURCE_REPOSITORY

    with pytest.raises(ValueError, match="another folder"):
        build(repositories["embedded"].parent / "small.pt", SOURCE_REPOSITORY, target="ngc", engine="onnxruntime")
