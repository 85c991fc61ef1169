"""Load any Hugging Face sequence-classification folder and predict label distributions.

The model never imports the transport: this module knows nothing of HTTP or Ray. The same
code path loads the embedded defaults, the tiny test models and a user's own folder.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from serving.classify import meanpool
from serving.classify.length_groups import plan_groups
from serving.classify.onnx_runtime import OnnxForward, Runtime
from serving.contracts import defaults
from serving.contracts.manifest import ModelManifest, read_manifest, weights_digest

logger = logging.getLogger(__name__)


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but CUDA is not available here")
    return torch.device(requested)


@dataclass(frozen=True)
class Prediction:
    probs: np.ndarray  # (n, k) float32, rows sum to 1
    truncated: list[bool]  # the text was longer than the model's window


class Classifier:
    """A loaded classifier: its version, labels, and a batched ``predict``."""

    def __init__(
        self,
        folder: Path,
        device: str = "auto",
        max_tokens: int | None = defaults.MAX_TOKENS,
        runtime: Runtime | None = None,
    ) -> None:
        """``runtime`` overrides the manifest's (``torch`` when there is none)."""
        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder} is not a model folder (no config.json)")
        meanpool.register()
        self.folder = folder
        self.device = pick_device(device)
        self.manifest: ModelManifest | None = read_manifest(folder)
        self.version = self.manifest.version if self.manifest else weights_digest(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            folder, use_safetensors=True
        ).to(self.device)
        self.model.eval()
        config = self.model.config
        self.labels = [config.id2label[i] for i in range(config.num_labels)]
        window = min(self.tokenizer.model_max_length, config.max_position_embeddings)
        # a version is served at the length it was trained and calibrated at
        recorded = self.manifest.max_tokens if self.manifest else None
        self.max_tokens = min(recorded or max_tokens or window, window)
        if self.manifest and self.manifest.labels != self.labels:
            raise ValueError(
                f"{folder}: manifest labels {self.manifest.labels} differ from the model's "
                f"{self.labels}"
            )
        self.runtime: Runtime = runtime or (self.manifest.runtime if self.manifest else "torch")
        if self.runtime != "torch" and self.device.type != "cpu":
            logger.warning("%s: runtime %s is for CPUs; serving with torch", folder, self.runtime)
            self.runtime = "torch"
        self._forward: Callable[[dict[str, torch.Tensor]], torch.Tensor] = (
            self._torch_forward
            if self.runtime == "torch"
            else OnnxForward(self.model, self.runtime, self.max_tokens)
        )

    def _torch_forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**batch).logits

    @torch.inference_mode()
    def predict(self, texts: list[str]) -> Prediction:
        """Probabilities per text, in the caller's order: each text is tokenized once, and
        the batch runs as groups of similar length (see :mod:`serving.classify.length_groups`)."""
        if not texts:
            return Prediction(np.zeros((0, len(self.labels)), dtype=np.float32), [])
        features, truncated = self.encode(texts)
        lengths = [len(f["input_ids"]) for f in features]
        probs = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        for group in plan_groups(lengths):
            batch = self.tokenizer.pad([features[i] for i in group], return_tensors="pt")
            logits = self._forward(dict(batch.to(self.device))).float()
            probs[group] = torch.softmax(logits, dim=-1).cpu().numpy()
        return Prediction(probs=probs, truncated=truncated)

    def encode(self, texts: list[str]) -> tuple[list[dict[str, list[int]]], list[bool]]:
        """Each text's token features, cut to ``max_tokens``, and whether it was cut.

        A fast tokenizer keeps what it cut off (``overflowing``), so one pass answers both;
        a slow one needs a second, untruncated pass over the texts that may be too long.
        """
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_tokens)
        keys = list(encoded.keys())
        features = [{k: encoded[k][i] for k in keys} for i in range(len(texts))]
        if encoded.is_fast:
            return features, [bool(e.overflowing) for e in encoded.encodings]
        return features, self._truncated(texts)

    def warm_up(self) -> float:
        """Run one small batch; returns its seconds (first calls pay one-off costs)."""
        start = time.perf_counter()
        self.predict(["warm up", "a second, longer warm-up input"])
        return time.perf_counter() - start

    def _truncated(self, texts: list[str]) -> list[bool]:
        # slow tokenizers only: a character yields at most 4 tokens (byte-level BPE, UTF-8)
        # plus a few special tokens, so only texts that may overflow are tokenized again
        flags = [False] * len(texts)
        long = [i for i, t in enumerate(texts) if 4 * len(t) + 4 > self.max_tokens]
        if long:
            lengths = self.tokenizer([texts[i] for i in long], truncation=False, verbose=False)[
                "input_ids"
            ]
            for i, ids in zip(long, lengths, strict=True):
                flags[i] = len(ids) > self.max_tokens
        return flags
