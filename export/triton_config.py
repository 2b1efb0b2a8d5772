"""Triton ``config.pbtxt`` generated from typed objects, never edited by hand (pytriton style).

The text written here is parsed back with Triton's own protobuf schema
(``tritonclient.grpc.model_config_pb2``) in the tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                 "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL", "bytes": "TYPE_STRING"}


def _q(s: str) -> str:
    return json.dumps(s)


@dataclass(frozen=True)
class TritonTensor:
    name: str
    dtype: str
    dims: tuple[int, ...]           # -1 for dynamic; without the batch axis when max_batch_size > 0
    optional: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in TRITON_DTYPES:
            raise ValueError(f"tensor {self.name}: unsupported dtype {self.dtype!r}")
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        if not self.dims or any(d == 0 or d < -1 for d in self.dims):
            raise ValueError(f"tensor {self.name}: dims must be positive or -1, got {self.dims}")

    def pbtxt(self) -> str:
        parts = [f"name: {_q(self.name)}", f"data_type: {TRITON_DTYPES[self.dtype]}",
                 f"dims: [ {', '.join(str(d) for d in self.dims)} ]"]
        if self.optional:
            parts.append("optional: true")
        return "{ " + " ".join(parts) + " }"


@dataclass(frozen=True)
class InstanceGroup:
    count: int = 1
    kind: str = "KIND_CPU"          # KIND_CPU | KIND_GPU | KIND_MODEL

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"instance_group.count must be >= 1, got {self.count}")
        if self.kind not in ("KIND_CPU", "KIND_GPU", "KIND_MODEL", "KIND_AUTO"):
            raise ValueError(f"instance_group.kind {self.kind!r} is not a Triton kind")

    def pbtxt(self) -> str:
        return f"{{ count: {self.count} kind: {self.kind} }}"


@dataclass(frozen=True)
class DynamicBatching:
    preferred_batch_size: tuple[int, ...] = ()
    max_queue_delay_microseconds: int = 0

    def pbtxt(self) -> str:
        parts = []
        if self.preferred_batch_size:
            parts.append(f"preferred_batch_size: [ {', '.join(map(str, self.preferred_batch_size))} ]")
        parts.append(f"max_queue_delay_microseconds: {self.max_queue_delay_microseconds}")
        return "dynamic_batching { " + " ".join(parts) + " }"


@dataclass(frozen=True)
class EnsembleStep:
    model_name: str
    input_map: dict[str, str]       # the step model's input -> ensemble tensor
    output_map: dict[str, str]      # the step model's output -> ensemble tensor
    model_version: int = -1

    def pbtxt(self) -> str:
        ins = " ".join(f"input_map {{ key: {_q(k)} value: {_q(v)} }}" for k, v in self.input_map.items())
        outs = " ".join(f"output_map {{ key: {_q(k)} value: {_q(v)} }}" for k, v in self.output_map.items())
        return f"{{ model_name: {_q(self.model_name)} model_version: {self.model_version} {ins} {outs} }}"


@dataclass(frozen=True)
class WarmupInput:
    name: str
    dtype: str
    dims: tuple[int, ...]
    zero_data: bool = True


@dataclass(frozen=True)
class ModelConfig:
    name: str
    inputs: tuple[TritonTensor, ...]
    outputs: tuple[TritonTensor, ...]
    backend: str | None = None            # "python", "onnxruntime", "tensorrt"
    platform: str | None = None           # "ensemble", "onnxruntime_onnx", "tensorrt_plan"
    max_batch_size: int = 0
    instance_groups: tuple[InstanceGroup, ...] = ()
    dynamic_batching: DynamicBatching | None = None
    response_cache: bool = False
    parameters: dict[str, str] = field(default_factory=dict)
    ensemble_steps: tuple[EnsembleStep, ...] = ()
    warmup: tuple[tuple[str, int, tuple[WarmupInput, ...]], ...] = ()   # (name, batch_size, inputs)

    def __post_init__(self) -> None:
        if (self.backend is None) == (self.platform is None):
            raise ValueError(f"model {self.name}: give exactly one of backend or platform")
        if self.platform == "ensemble" and not self.ensemble_steps:
            raise ValueError(f"ensemble {self.name} has no steps")
        if self.max_batch_size < 0:
            raise ValueError(f"model {self.name}: max_batch_size must be >= 0")
        names = [t.name for t in self.inputs + self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"model {self.name}: duplicate tensor names {names}")

    def pbtxt(self) -> str:
        lines = [f"name: {_q(self.name)}"]
        lines.append(f"backend: {_q(self.backend)}" if self.backend else f"platform: {_q(self.platform)}")
        lines.append(f"max_batch_size: {self.max_batch_size}")
        lines.append("input [\n  " + ",\n  ".join(t.pbtxt() for t in self.inputs) + "\n]")
        lines.append("output [\n  " + ",\n  ".join(t.pbtxt() for t in self.outputs) + "\n]")
        if self.instance_groups:
            lines.append("instance_group [ " + ", ".join(g.pbtxt() for g in self.instance_groups) + " ]")
        if self.dynamic_batching:
            lines.append(self.dynamic_batching.pbtxt())
        if self.response_cache:
            lines.append("response_cache { enable: true }")
        for k, v in self.parameters.items():
            lines.append(f"parameters {{ key: {_q(k)} value {{ string_value: {_q(str(v))} }} }}")
        if self.ensemble_steps:
            lines.append("ensemble_scheduling {\n  step [\n    " +
                         ",\n    ".join(s.pbtxt() for s in self.ensemble_steps) + "\n  ]\n}")
        for name, batch, inputs in self.warmup:
            ins = " ".join(f"inputs {{ key: {_q(i.name)} value {{ data_type: {TRITON_DTYPES[i.dtype]} "
                           f"dims: [ {', '.join(map(str, i.dims))} ] zero_data: true }} }}" for i in inputs)
            lines.append(f"model_warmup {{ name: {_q(name)} batch_size: {batch} {ins} }}")
        return "\n".join(lines) + "\n"
