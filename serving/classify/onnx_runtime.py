"""Serve a classifier through ONNX Runtime on CPU, exported from its safetensors weights.

The graph is exported when the model loads (PyTorch's dynamo exporter), in memory: the
registry holds only safetensors weights, never a serialized graph. ``onnx`` runs the float
graph, which on a small CPU answers the same probabilities (to about 1e-6) with far less
per-call overhead than eager PyTorch; ``onnx-int8`` also quantizes the weights
(``onnxruntime.quantization.quantize_dynamic``, per channel), which changes answers and
must pass ``protege optimize``'s agreement bound before a version uses it.
"""

from __future__ import annotations

import inspect
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch

Runtime = Literal["torch", "onnx", "onnx-int8"]
RUNTIMES: tuple[str, ...] = ("torch", "onnx", "onnx-int8")
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class _LogitsOnly(torch.nn.Module):
    """Positional tensors in, plain logits out (the exporter wants no ModelOutput)."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, tensors, strict=True))).logits


def export(model: torch.nn.Module, max_tokens: int) -> tuple[bytes, list[str]]:
    """The model's graph as ONNX bytes, dynamic in batch and length, and its input names."""
    takes = inspect.signature(model.forward).parameters
    names = [n for n in INPUT_NAMES if n in takes]
    example = {
        "input_ids": torch.full((2, 8), 5, dtype=torch.long),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
        "token_type_ids": torch.zeros(2, 8, dtype=torch.long),
    }
    example["attention_mask"][0, 5:] = 0  # one padded row keeps the masking path
    batch = torch.export.Dim("batch", max=4096)
    seq = torch.export.Dim("seq", max=max(max_tokens, 9))
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _LogitsOnly(model.eval().cpu(), names),
            tuple(example[n] for n in names),
            input_names=names,
            output_names=["logits"],
            dynamo=True,
            dynamic_shapes=(tuple({0: batch, 1: seq} for _ in names),),
            verbose=False,
        )
    assert program is not None
    return program.model_proto.SerializeToString(), names


def quantize_int8(graph: bytes) -> bytes:
    """Int8 weights, dynamic int8 activations, per output channel."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(graph)
        logging.disable(logging.WARNING)  # its advice to pre-process, on the root logger
        try:
            quantize_dynamic(
                str(source), str(target), weight_type=QuantType.QInt8, per_channel=True
            )
        finally:
            logging.disable(logging.NOTSET)
        return target.read_bytes()


class OnnxForward:
    """Called like the model on the tokenizer's padded batch; returns the logits."""

    def __init__(self, model: torch.nn.Module, runtime: Runtime, max_tokens: int) -> None:
        import onnxruntime as ort

        graph, self.names = export(model, max_tokens)
        if runtime == "onnx-int8":
            graph = quantize_int8(graph)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as torch would use
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        feed = {}
        for name in self.names:
            value = batch.get(name)
            if value is None:  # a tokenizer without token types: all zeros, as BERT assumes
                value = torch.zeros_like(batch["input_ids"])
            feed[name] = np.ascontiguousarray(value.numpy(), dtype=np.int64)
        return torch.from_numpy(self.session.run(["logits"], feed)[0])
