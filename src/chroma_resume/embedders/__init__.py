"""The embedders: one protocol (base.Embedder), one module per runtime (torch_runtime, onnx_runtime
with its int8, hash_standin), one probe check shared by all (probe), and one function that picks and
checks the embedder for a configuration (select.load). Callers import from here."""
from __future__ import annotations

from .base import CPU_BATCH, CUDA_BATCH, Embedder, OnPass, length_batches
from .hash_standin import HashEmbedder
from .onnx_runtime import OnnxEmbedder
from .select import choose, describe, load, needs_transformers, prepare
from .torch_runtime import FlagEmbedder, load_torch

__all__ = ["CPU_BATCH", "CUDA_BATCH", "Embedder", "FlagEmbedder", "HashEmbedder", "OnPass", "OnnxEmbedder", "choose",
           "describe", "length_batches", "load", "load_torch", "needs_transformers", "prepare"]
