"""Seeded fuzzing of every served model over gRPC: a malformed request is never INTERNAL, UNKNOWN or
RESOURCE_EXHAUSTED, and the server keeps answering.

Requests are built as raw ``ModelInferRequest`` protobufs (tritonclient refuses some malformed requests
client-side, e.g. a byte size that does not match the shape), from each model's served metadata:
random shapes (0-length and large axes), wrong dtypes and ranks, missing and extra inputs, byte lengths
that do not match, malformed string tensors, empty, 100 kB and non-UTF-8 strings, NaN and huge values.
"""

import logging
import os
import struct
import time

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

pytestmark = pytest.mark.server
log = logging.getLogger(__name__)

# a longer hunt: DUPLUS_FUZZ_SEED=1 DUPLUS_FUZZ_REQUESTS=200 pytest tests/serving/test_fuzz.py
SEED = int(os.environ.get("DUPLUS_FUZZ_SEED", 20261202))
REQUESTS_PER_MODEL = int(os.environ.get("DUPLUS_FUZZ_REQUESTS", 24))
BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.RESOURCE_EXHAUSTED}
NUMPY = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32, "UINT8": np.uint8,
         "BOOL": np.bool_, "FP16": np.float16}
STRINGS = [b"", b"CT", b"MR", b"liver", b"CT of the abdomen", b"\xff\xfe\x00liver", "x" * 100_000,
           "primary tumour " * 7000, "f\u00e9ie " * 50, b"\x00" * 33, "T2-weighted MRI of the abdomen"]
DIMS = [0, 1, 1, 2, 3, 5, 16, 17, 32, 600, 4097]
MAX_ELEMENTS = 1 << 19
MAX_STRINGS = 8            # at most one 100 kB string per tensor (see _tensor)


def _serialize_strings(values) -> bytes:
    parts = []
    for v in values:
        b = v if isinstance(v, bytes) else str(v).encode("utf-8")
        parts.append(struct.pack("<I", len(b)) + b)
    return b"".join(parts)


def _tensor(rng, name, datatype, shape):
    """(InferInputTensor, raw bytes) with random contents."""
    n = int(np.prod(shape)) if shape else 1
    if datatype == "BYTES":
        values = [STRINGS[rng.integers(len(STRINGS))] for _ in range(n)]
        values = [v if len(v) < 1000 or i == 0 else "liver" for i, v in enumerate(values)]
        raw = _serialize_strings(values)
    else:
        dt = NUMPY[datatype]
        if np.issubdtype(dt, np.floating):
            x = rng.normal(0, 10 ** rng.integers(0, 6), n).astype(dt)
            if n and rng.random() < 0.2:
                x[rng.integers(n)] = rng.choice([np.nan, np.inf, -np.inf])
        elif dt is np.bool_:
            x = rng.random(n) < 0.5
        else:
            info = np.iinfo(dt)
            x = rng.choice([rng.integers(0, 3, n), rng.integers(-5, 40000, n),
                            rng.integers(info.min, info.max, n, dtype=dt)]).astype(dt)
        raw = x.tobytes()
    t = service_pb2.ModelInferRequest().InferInputTensor(name=name, datatype=datatype, shape=list(shape))
    return t, raw


def _shape(rng, dims, datatype="FP32"):
    shape = [int(d) if d != -1 else int(rng.choice(DIMS)) for d in dims]
    cap = MAX_STRINGS if datatype == "BYTES" else MAX_ELEMENTS
    while int(np.prod(shape)) > cap:   # keep the message within reason: shrink the largest axis
        i = int(np.argmax(shape))
        shape[i] = max(1, shape[i] // 8)
    return shape


def _request(rng, model, inputs):
    """A random request for ``model`` from its metadata inputs [(name, datatype, dims)]; (kind, request)."""
    kind = rng.choice(["random", "random", "random", "dtype", "rank", "missing", "extra", "bytes", "strings"])
    req = service_pb2.ModelInferRequest(model_name=model)
    chosen = inputs
    if kind == "missing" and len(inputs) > 1:
        drop = rng.integers(len(inputs))
        chosen = [x for i, x in enumerate(inputs) if i != drop]
    for name, datatype, dims in chosen:
        if kind == "dtype" and rng.random() < 0.5:
            datatype = str(rng.choice([d for d in [*NUMPY, "BYTES"] if d != datatype]))
        shape = _shape(rng, dims, datatype)     # after the dtype: a string tensor holds few elements
        if kind == "rank" and rng.random() < 0.5:
            shape = shape + [1] if rng.random() < 0.5 else shape[:-1]
        t, raw = _tensor(rng, name, datatype, shape)
        if kind == "bytes" and rng.random() < 0.5:
            raw = raw[: len(raw) // 2] if rng.random() < 0.5 else raw + b"\x01" * 7
        if kind == "strings" and datatype == "BYTES":
            raw = struct.pack("<I", 1 << 20) + b"abc"   # a length prefix beyond the tensor's bytes
        req.inputs.append(t)
        req.raw_input_contents.append(raw)
    if kind == "extra":
        t, raw = _tensor(rng, "UNEXPECTED", "FP32", [2])
        req.inputs.append(t)
        req.raw_input_contents.append(raw)
    return str(kind), req


def _metadata(stub, model):
    meta = stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=model))
    return [(t.name, t.datatype, list(t.shape)) for t in meta.inputs]


@pytest.fixture(scope="module")
def stub(triton_server):
    limit = 64 * 1024 * 1024
    channel = grpc.insecure_channel(triton_server.grpc_url, options=[("grpc.max_send_message_length", limit),
                                                                     ("grpc.max_receive_message_length", limit)])
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def _good_requests():
    """One valid request per model (cheap ones: small volume, few tokens)."""
    from tests.serving.test_triton_server import SMALL_AFFINE, SMALL_VOLUME

    def strings(*values):
        return ("BYTES", [len(values)], _serialize_strings(values))

    def array(x, datatype):
        return (datatype, list(x.shape), np.ascontiguousarray(x).tobytes())

    prompts = {"MODALITY": strings("CT"), "T1": strings("CT of the abdomen"), "TARGETS": strings("liver")}
    tokens = {"input_ids": array(np.array([[101, 2000, 102]], np.int64), "INT64"),
              "attention_mask": array(np.ones((1, 3), np.int64), "INT64")}
    image = {"image": array(np.zeros((1, 1, 16, 16, 16), np.float32), "FP32"),
             "modality": array(np.zeros(1, np.int64), "INT64"),
             "film": array(np.zeros((1, 736), np.float32), "FP32"),
             "head_params": array(np.zeros((1, 281), np.float32), "FP32")}
    volume = {"VOLUME": array(SMALL_VOLUME, "FP32"), "AFFINE": array(SMALL_AFFINE.astype(np.float64), "FP64")}
    pet = np.zeros((48, 48, 32), np.float32)
    return {
        "tokenizer": prompts, "text_encoder": tokens, "text_encoder_ehr": tokens,
        "conditioning": {"t1_embedding": array(np.zeros((1, 384), np.float32), "FP32"),
                         "t2_embedding": array(np.zeros((2, 384), np.float32), "FP32")},
        "segmenter": image, "image_features": dict(image, head_params=array(np.zeros((2, 281), np.float32), "FP32")),
        "instructions": {"TARGETS": strings("liver", "spleen"),
                         "CONTEXT": strings('{"modality": "MR", "sequence": "T2", "region": "abdomen"}')},
        "encode_instructions": dict(prompts, CONTEXT=strings('{"modality": "CT", "patient_sex": "F"}')),
        "encode_prompts": prompts, "segment_patch": dict(prompts, IMAGE=array(np.zeros((1, 1, 16, 16, 16),
                                                                                    np.float32), "FP32")),
        "segment_volume": dict(volume, **prompts),
        "prognose": {"VOLUME": array(pet, "FP32"), "AFFINE": array(np.diag([4.0, 4.0, 4.0, 1.0]), "FP64"),
                     "MODALITY": strings("PET"), "T1": strings("PET of the head and neck"),
                     "EHR": strings("62-year-old man, HPV positive, smoker, T2 N1.")},
        "pemma_segmenter": {"image": array(np.zeros((1, 2, 64, 64, 64), np.float32), "FP32"),
                            "mode": array(np.zeros(1, np.int64), "INT64")},
        "segment_petct": {"PET": array(pet, "FP32"), "PET_AFFINE": array(np.diag([4.0, 4.0, 4.0, 1.0]), "FP64")},
        "context_classifier": {"views": array(np.zeros((1, 3, 64, 64), np.float32), "FP32")},
        "classify_context": dict(volume, T1=strings("MRI of the abdomen")),
    }


def _send_good(stub, model, feed):
    req = service_pb2.ModelInferRequest(model_name=model)
    for name, (datatype, shape, raw) in feed.items():
        req.inputs.append(service_pb2.ModelInferRequest().InferInputTensor(name=name, datatype=datatype, shape=shape))
        req.raw_input_contents.append(raw)
    return stub.ModelInfer(req, timeout=120)


def test_fuzzed_requests_never_fail_inside_the_server(triton_server, stub):
    rng = np.random.default_rng(SEED)
    good = _good_requests()
    models = triton_server.models()
    # prognosis needs the image feature width of the build; its good request comes from the metadata
    meta = {m: _metadata(stub, m) for m in models}
    if "prognosis" in models:
        dims = {name: d for name, _t, d in meta["prognosis"]}
        good["prognosis"] = {n: ("FP32", [1, dims[n][1]], np.zeros((1, dims[n][1]), np.float32).tobytes())
                             for n in dims}
    assert set(models) <= set(good), set(models) - set(good)
    codes: dict[str, int] = {}
    failures = []
    for model in models:
        for _ in range(REQUESTS_PER_MODEL):
            kind, req = _request(rng, model, meta[model])
            t0 = time.perf_counter()
            log.info("%s %s %s", model, kind, [(t.name, t.datatype, list(t.shape)) for t in req.inputs])
            try:
                stub.ModelInfer(req, timeout=120)
                codes["OK"] = codes.get("OK", 0) + 1
                log.info("  OK in %.2f s", time.perf_counter() - t0)
            except grpc.RpcError as exc:
                codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
                log.info("  %s in %.2f s: %s", exc.code().name, time.perf_counter() - t0, exc.details()[:200])
                if exc.code() in BAD_CODES:
                    shapes = [(t.name, t.datatype, list(t.shape)) for t in req.inputs]
                    failures.append((model, kind, shapes, exc.code().name, exc.details()[:300]))
                else:
                    assert len(exc.details()) < 2048, (model, kind)   # never echoes a 100 kB prompt
        # the server is live and the model answers a good request after the batch
        assert stub.ServerLive(service_pb2.ServerLiveRequest()).live
        _send_good(stub, model, good[model])
    assert not failures, failures
    assert sum(codes.values()) == len(models) * REQUESTS_PER_MODEL
    assert codes.get("INVALID_ARGUMENT", 0) > len(models) * REQUESTS_PER_MODEL // 2, codes
