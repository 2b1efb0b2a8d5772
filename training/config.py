"""Training configuration: frozen dataclasses, loaded from YAML and validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from duplus.config import read_yaml_config
from duplus.models.duplus import DuPLUSConfig
from duplus.vocabulary import MODALITIES, REGIONS, TARGET_SYNONYMS


@dataclass(frozen=True)
class PhantomSpec:
    """How to generate a phantom data set when its folder does not exist yet."""

    region: str
    modality: str
    cases: int
    seed: int
    labelled: tuple[str, ...] | None = None
    sequence: str | None = None

    def __post_init__(self) -> None:
        if self.region not in REGIONS:
            raise ValueError(f"phantom.region must be one of {REGIONS}, got {self.region!r}")
        if self.modality not in MODALITIES:
            raise ValueError(f"phantom.modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.cases < 1:
            raise ValueError(f"phantom.cases must be >= 1, got {self.cases}")
        if self.labelled is not None:
            object.__setattr__(self, "labelled", tuple(self.labelled))
            bad = [t for t in self.labelled if t not in TARGET_SYNONYMS]
            if bad:
                raise ValueError(f"phantom.labelled has unknown targets {bad}")


@dataclass(frozen=True)
class DatasetSpec:
    path: str                         # Decathlon folder, relative to TrainConfig.data_root or absolute
    phantom: PhantomSpec | None = None
    val_cases: int = 2                # the last N cases are held out for validation
    weight: float = 1.0               # sampling weight between data sets
    region: str | None = None         # override when dataset.json does not say

    def __post_init__(self) -> None:
        if isinstance(self.phantom, dict):
            object.__setattr__(self, "phantom", PhantomSpec(**self.phantom))
        if self.val_cases < 0:
            raise ValueError(f"dataset.val_cases must be >= 0, got {self.val_cases}")
        if self.weight <= 0:
            raise ValueError(f"dataset.weight must be > 0, got {self.weight}")


@dataclass(frozen=True)
class OptimConfig:
    steps: int = 2000
    batch_size: int = 2
    lr: float = 2e-3
    weight_decay: float = 1e-5
    warmup: int = 50
    grad_clip: float = 1.0
    targets_per_step: int = 3         # K target prompts asked per step (a random subset of the labelled ones)
    foreground_prob: float = 0.85     # chance that a patch is centred on a labelled voxel
    bf16: bool = True                 # bfloat16 autocast where native (AMX / AVX512-BF16 CPUs, GPUs); else fp32

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "targets_per_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"optim.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise ValueError(f"optim.lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.foreground_prob <= 1:
            raise ValueError(f"optim.foreground_prob must be in [0, 1], got {self.foreground_prob}")


@dataclass(frozen=True)
class InstructionTraining:
    """Zeus's stage in training: some target prompts are generated clinical instructions instead of names.

    For every (target, modality, region, MR sequence) a data set labels, ``per_context`` instructions are written
    by the offline knowledge base (``duplus.instructions``) before training, each for a varied image context
    (slice thickness, patient sex and age drawn from ``seed``), and their embeddings are cached. At each step
    each asked target is conditioned, with probability ``prob``, by one of its instructions for the context of
    the step's data set (the MR sequence of the step's first patch); otherwise by a name or short description as
    before. Generator seeds start at ``seed``, far from the seeds the held-out evaluation uses (0, 1, ...).
    """

    prob: float = 0.0                 # 0: names and descriptions only (the demo checkpoint)
    per_context: int = 48
    seed: int = 1_000_000

    def __post_init__(self) -> None:
        if not 0 <= self.prob <= 1:
            raise ValueError(f"instructions.prob must be in [0, 1], got {self.prob}")
        if not 1 <= self.per_context <= 1000:
            raise ValueError(f"instructions.per_context must be in [1, 1000], got {self.per_context}")
        if self.seed < 10_000:
            raise ValueError(f"instructions.seed must be >= 10000 (seeds below are the held-out evaluation's), "
                             f"got {self.seed}")


@dataclass(frozen=True)
class TrainConfig:
    output: str
    datasets: tuple[DatasetSpec, ...]
    data_root: str = "data"
    model: DuPLUSConfig = field(default_factory=DuPLUSConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    instructions: InstructionTraining = field(default_factory=InstructionTraining)
    val_every: int = 250
    seed: int = 0
    threads: int = 0                  # 0: all cores
    device: str = "auto"              # auto | cpu | cuda
    init_from: str | None = None      # start from these weights (fine-tuning / continuing on another machine)

    def __post_init__(self) -> None:
        object.__setattr__(self, "datasets", tuple(d if isinstance(d, DatasetSpec) else DatasetSpec(**d)
                                                   for d in self.datasets))
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", DuPLUSConfig(**self.model))
        if isinstance(self.optim, dict):
            object.__setattr__(self, "optim", OptimConfig(**self.optim))
        if isinstance(self.instructions, dict):
            object.__setattr__(self, "instructions", InstructionTraining(**self.instructions))
        if not self.datasets:
            raise ValueError("datasets must list at least one data set")
        if self.val_every < 1:
            raise ValueError(f"val_every must be >= 1, got {self.val_every}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

    def dataset_path(self, spec: DatasetSpec) -> Path:
        p = Path(spec.path)
        return p if p.is_absolute() else Path(self.data_root) / p

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> TrainConfig:
        return cls(**read_yaml_config(path, cls, **overrides))


# --------------------------------------------------------------------------------------
# PEMMA (PET/CT adaptation of a CT-pretrained UNETR): configs/pemma.yaml
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CentreSet:
    """Cases of some simulated centres (duplus.synth.phantoms.petct.CENTRES), generated on first use."""

    centres: tuple[str, ...]
    cases: int                        # per centre
    seed: int

    def __post_init__(self) -> None:
        from duplus.synth.phantoms.petct import CENTRES

        object.__setattr__(self, "centres", tuple(self.centres))
        bad = [c for c in self.centres if c not in CENTRES]
        if bad or not self.centres:
            raise ValueError(f"centres must be among {tuple(CENTRES)}, got {list(self.centres)}")
        if self.cases < 1:
            raise ValueError(f"cases must be >= 1, got {self.cases}")


@dataclass(frozen=True)
class StageConfig:
    """One training run of the PEMMA study: its data, budget and input modes."""

    data: str                         # a key of PemmaConfig.data
    steps: int
    lr: float
    batch_size: int = 2
    warmup: int = 30
    foreground_prob: float = 0.67
    ct_only_prob: float = 0.0         # modality dropout: share of batches with the PET withheld
    pet_only_prob: float = 0.0        # ... and with the CT withheld
    val_cases: int = 2                # the last N cases of the data are the validation curve's (never held-out)
    val_every: int = 100
    pet_pathway: dict = field(default_factory=dict)   # PemmaUNETR.add_pet_pathway options (deep_skips, ...)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError(f"stage needs steps >= 1, lr > 0, batch_size >= 1; got {self}")
        if not (0 <= self.ct_only_prob and 0 <= self.pet_only_prob and self.ct_only_prob + self.pet_only_prob < 1):
            raise ValueError("ct_only_prob and pet_only_prob must be >= 0 and sum to less than 1")


@dataclass(frozen=True)
class PemmaConfig:
    """The PEMMA study: model size, the data of each centre set, the held-out sets and the training stages."""

    output: str = "runs/pemma"
    data_root: str = "data/hecktor_phantoms"
    seed: int = 0
    threads: int | None = None
    model: dict = field(default_factory=dict)       # duplus.models.pemma.UnetrConfig fields
    adapter: dict = field(default_factory=dict)     # duplus.models.pemma.AdapterConfig fields
    data: dict = field(default_factory=dict)        # name -> CentreSet (training data)
    heldout: dict = field(default_factory=dict)     # name -> CentreSet (never trained or tuned on)
    stages: dict = field(default_factory=dict)      # name -> StageConfig

    def __post_init__(self) -> None:
        for key in ("data", "heldout"):
            object.__setattr__(self, key, {k: v if isinstance(v, CentreSet) else CentreSet(**v)
                                           for k, v in getattr(self, key).items()})
        object.__setattr__(self, "stages", {k: v if isinstance(v, StageConfig) else StageConfig(**v)
                                            for k, v in self.stages.items()})
        for name, stage in self.stages.items():
            if stage.data not in self.data:
                raise ValueError(f"stage {name!r} trains on {stage.data!r}, which is not in data {sorted(self.data)}")
        seeds = [s.seed for s in self.data.values()]
        clash = {s.seed for s in self.heldout.values()} & set(seeds)
        if clash:
            raise ValueError(f"held-out sets reuse training seeds {sorted(clash)}")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> PemmaConfig:
        return cls(**read_yaml_config(path, cls, **overrides))
