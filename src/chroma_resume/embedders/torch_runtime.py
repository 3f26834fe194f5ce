"""Embedders: FlagEmbedding for real indexes, a hash stand-in for smoke runs and fault matrices.

FlagEmbedding and torch are imported only inside `load`, so a run with nothing
to embed never pays for them. What a model is (its files, declarations and
identity) is models.py's: this module only runs it.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import re
import struct
from collections.abc import Iterator, Sequence

import numpy as np

from . import models
from .config import Config
from .errors import ModelLoadError


class HashEmbedder:
    """Deterministic unit vectors from SHA-256 of the text: same text, same vector."""

    def __init__(self, dim: int):
        self.dim = dim
        self.name = f"hash:{dim}"
        self.embedded = 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.embedded += len(texts)
        return np.array([self._vector(t) for t in texts], dtype=np.float32).reshape(len(texts), self.dim)

    def _vector(self, text: str) -> list[float]:
        raw = b""
        counter = 0
        while len(raw) < 4 * self.dim:
            raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
            counter += 1
        values = [v / 2**31 - 1.0 for v in struct.unpack(f"<{self.dim}I", raw[: 4 * self.dim])]
        norm = math.sqrt(sum(v * v for v in values)) or 1.0
        return [v / norm for v in values]


class FlagEmbedder:
    """Encodes with a FlagEmbedding FlagModel's own tokenizer, network and pooling, normalized.

    We run the forward passes ourselves instead of calling `encode_corpus` because that
    method, called once per commit group, re-runs a batch-size probe (one extra forward
    pass per call: +12% at 256 chunks per group) and prints progress bars of its own.
    """

    def __init__(self, flag, name: str, batch_size: int, device: str, bf16: bool = False):
        import torch

        self.torch = torch
        self.flag, self.name, self.batch_size, self.device = flag, name, batch_size, device
        # --backend torch-bf16: matrix products in bfloat16 (AMX on CPUs that have it), the pooling and
        # normalisation of their float32 results
        self.precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.dim = flag.model.config.hidden_size  # cls and mean pooling keep the hidden size
        self.embedded = 0
        # We pad pre-tokenized batches on purpose (tokenizing once is the point); silence the hint.
        flag.tokenizer.deprecation_warnings["Asking-to-pad-a-fast-tokenizer"] = True

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, in the order given. The texts are tokenized once and
        batched by token count, so each batch pads only to its own longest text (character
        length mixes CJK, code and prose and roughly doubles the padding)."""
        torch, flag = self.torch, self.flag
        vectors = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return vectors
        tokens = flag.tokenizer(list(texts), truncation=True, max_length=flag.passage_max_length)
        with torch.inference_mode(), self.precision():
            for picked in length_batches([len(ids) for ids in tokens["input_ids"]], self.batch_size):
                batch = flag.tokenizer.pad({k: [v[i] for i in picked] for k, v in tokens.items()},
                                           return_tensors="pt").to(self.device)
                hidden = flag.model(**batch, return_dict=True).last_hidden_state.float()
                pooled = flag.pooling(hidden, batch["attention_mask"])
                vectors[picked] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        self.embedded += len(texts)
        return vectors


def length_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indexes by descending token count, batch_size at a time: each batch pads only to its own
    longest text. Every backend batches through here, so they pad (and round) alike."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for lo in range(0, len(order), batch_size):
        yield order[lo:lo + batch_size]


# ---- loading ---------------------------------------------------------------------

# Texts per forward pass when --embed-batch is not given: a GPU needs large batches to be busy
# (and token-length batching keeps their padding small); a CPU gains nothing past ~32.
CPU_BATCH, CUDA_BATCH = 32, 256


def load(c: Config, warn=None):
    """Load the embedder named by the config, or raise ModelLoadError (exit 2) naming it. A build has
    run the same preflight before writing anything. --backend auto/onnx on a CPU go through
    onnx_backend, which falls back to torch (WARNing through `warn`) unless its export passed the
    probe check."""
    if models.is_stand_in(c):
        return HashEmbedder(models.preflight(c).dim)
    if c.backend in ("auto", "onnx", "onnx-int8") and c.device == "cpu":
        from . import onnx_backend
        from .reporting import Warnings
        return onnx_backend.load(c, warn or Warnings())
    return load_torch(c)


def prepare(c: Config, warn) -> None:
    """What must exist before a build's first act. The model loads lazily (a no-op build never pays
    for it), but --backend onnx-int8 has no fallback: its export is made, or refused with exit 2,
    now, rather than at the first cache miss after a schema reset had emptied the collection. And a
    bfloat16 build on a CPU without bfloat16 units is said before it starts."""
    if models.is_stand_in(c):
        return
    if c.backend == "onnx-int8":
        from . import onnx_backend
        onnx_backend.quantized_export(c, warn)
    if c.backend == "torch-bf16" and not native_bf16():
        warn("bf16_not_native", cpu=CPU_INFO, cause="neither amx_bf16 nor avx512_bf16 among the CPU's flags: "
             "bfloat16 is emulated here, slower than float32", fix="--backend auto")


CPU_INFO = "/proc/cpuinfo"


def native_bf16() -> bool:
    """Whether the CPU computes bfloat16 itself (AMX or AVX-512 BF16), read from Linux's CPU flags;
    True where they cannot be read (another OS): no claim without evidence."""
    try:
        with open(CPU_INFO, encoding="utf-8", errors="replace") as fh:
            flags = fh.read()
    except OSError:
        return True
    return re.search(r"\b(amx_bf16|avx512_bf16)\b", flags) is not None


def load_torch(c: Config) -> FlagEmbedder:
    """FlagEmbedding's model run by torch: every GPU build, and the reference the ONNX export is checked
    against. The preflight gives the location and the max length to use."""
    info = models.preflight(c)
    try:
        import torch
        from FlagEmbedding import FlagModel
    except ImportError as exc:
        raise ModelLoadError(f"FlagEmbedding is not importable ({exc}); install the project's dependencies") from None
    device, half = models.resolve_device(c.device, c.fp16, torch.cuda.device_count())
    batch = c.embed_batch or (CUDA_BATCH if device.startswith("cuda") else CPU_BATCH)
    try:
        flag = FlagModel(info.location, pooling_method=models.pooling(c), normalize_embeddings=True,
                         use_fp16=half, devices=device, batch_size=batch)
        flag.model.to(device).eval()
    except Exception as exc:  # any loader failure is the model's fault, not ours
        raise ModelLoadError(f"cannot load model {c.embed_model!r} from {info.location}: {exc}") from None
    flag.passage_max_length = info.max_length or flag.passage_max_length
    return FlagEmbedder(flag, c.embed_model, batch, device, bf16=c.backend == "torch-bf16")
