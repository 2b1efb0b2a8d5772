"""The tensor contract of the exported units (torch-free, so serving processes import it cheaply)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                     # numpy dtype name: float32, int64, uint8
    shape: tuple[int | str, ...]   # ints are fixed, strings name dynamic axes

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16", "int64", "int32", "uint8", "bool"):
            raise ValueError(f"TensorSpec {self.name}: unsupported dtype {self.dtype!r}")
        object.__setattr__(self, "shape", tuple(self.shape))

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: s for i, s in enumerate(self.shape) if isinstance(s, str)}


@dataclass(frozen=True)
class UnitContract:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str = ""

    @classmethod
    def from_manifest(cls, name: str, entry: dict) -> UnitContract:
        """The contract as ``build_engines`` recorded it in manifest.json."""
        def specs(rows):
            return tuple(TensorSpec(n, d, tuple(s)) for n, d, s in rows)

        return cls(name, specs(entry["inputs"]), specs(entry["outputs"]))

