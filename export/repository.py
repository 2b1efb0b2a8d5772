"""The Triton model repository around the built units: every config.pbtxt (typed objects,
``export/triton_config.py``), the python-backend sources, tokenizers, the known-target embeddings, and the
checkpoints the torch engine runs its units from."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from duplus.contract import KNOWN_TARGETS
from export.triton_config import GENERATOR_CONFIG, RepositoryOptions, parse_pbtxt, repository_models

log = logging.getLogger(__name__)

#: the checked-in repository: the python-backend model.py of every model
SOURCE_REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
#: what the torch engine's units run from, beside manifest.json (``serving.runtime.TorchRunner`` reads them)
CHECKPOINT = "checkpoint.pt"
PROGNOSIS_CHECKPOINT = "prognosis_checkpoint.pt"
PEMMA_CHECKPOINT = "pemma_checkpoint.pt"
CONTEXT_CHECKPOINT = "context_checkpoint.pt"


def copy_checkpoint(source: Path, output: Path, name: str) -> Path:
    """``source`` copied to ``output/name`` (the torch engine's units run from it); returns the copy."""
    target = output / name
    output.mkdir(parents=True, exist_ok=True)
    if not target.exists() or target.resolve() != Path(source).resolve():
        shutil.copyfile(source, target)
    return target


def write_generator_config(output: Path, source: Path | None = None) -> Path:
    """``instructions/1/generator.yaml``: a copy of ``source`` (a ``GeneratorConfig`` YAML, checked here) or the
    default, the offline knowledge base. Operators may edit it (an HTTP endpoint, a local model folder) and reload."""
    from duplus.instructions import GeneratorConfig

    target = output / "instructions" / "1" / GENERATOR_CONFIG
    target.parent.mkdir(parents=True, exist_ok=True)
    if source is not None:
        GeneratorConfig.from_yaml(source)   # a bad file fails the build, not the server's start
        text = Path(source).read_text()
    else:
        text = ("# duplus.instructions.GeneratorConfig of the served instruction generator (INSTRUCTIONS auto)\n"
                "backend: knowledge_base\n")
    target.write_text(text)
    return target


def write_triton_repository(output: Path, opts: RepositoryOptions, spec, encoder, predictor,
                            generator_config: Path | None = None) -> list[str]:
    """config.pbtxt for every model, python-backend sources, the prompt tokenizer, the instruction generator's
    configuration and the known-target embeddings (``predictor``: a ``duplus.inference.Predictor`` of the model);
    returns the model names."""
    models = repository_models(spec, opts)
    for m in models:
        folder = output / m.name
        (folder / "1").mkdir(parents=True, exist_ok=True)
        text = m.pbtxt()
        parse_pbtxt(text)  # Triton's own schema
        (folder / "config.pbtxt").write_text(text)
        if m.name in opts.python_models:
            source = SOURCE_REPOSITORY / m.name / "1" / "model.py"
            if (folder / "1" / "model.py").resolve() != source.resolve():
                shutil.copyfile(source, folder / "1" / "model.py")
        elif (folder / "1" / "model.py").exists() and folder.resolve().parent != SOURCE_REPOSITORY.resolve():
            (folder / "1" / "model.py").unlink()   # a native model of the ngc flavour
        log.info("wrote %s/config.pbtxt (%s)", m.name, m.backend or m.platform)
    encoder.tokenizer.save_pretrained(str(output / "tokenizer" / "1" / "tokenizer"))
    write_generator_config(output, generator_config)
    names, emb = predictor.known_target_embeddings()
    np.savez(output / "segment_volume" / "1" / KNOWN_TARGETS, names=np.array(names), embeddings=emb.numpy())
    return [m.name for m in models]


def save_prognosis_tokenizer(tokenizer, output: Path) -> None:
    """The EHR tokenizer for the ``prognose`` model."""
    tokenizer.save_pretrained(str(output / "prognose" / "1" / "tokenizer"))
