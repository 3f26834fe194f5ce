"""The hash stand-in (`--embed-model hash:DIM`): for smoke runs and fault matrices, no model at all."""
from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence

import numpy as np

from .base import OnPass


class HashEmbedder:
    """Deterministic unit vectors from SHA-256 of the text: same text, same vector."""

    precision = "float32"

    def __init__(self, dim: int):
        self.dim = dim
        self.name = f"hash:{dim}"
        self.embedded = 0

    def encode(self, texts: Sequence[str], on_pass: OnPass | None = None) -> np.ndarray:
        self.embedded += len(texts)
        vectors = np.array([self._vector(t) for t in texts], dtype=np.float32).reshape(len(texts), self.dim)
        if on_pass:
            on_pass(len(texts))
        return vectors

    def _vector(self, text: str) -> list[float]:
        raw = b""
        counter = 0
        while len(raw) < 4 * self.dim:
            raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
            counter += 1
        values = [v / 2**31 - 1.0 for v in struct.unpack(f"<{self.dim}I", raw[: 4 * self.dim])]
        norm = math.sqrt(sum(v * v for v in values)) or 1.0
        return [v / norm for v in values]
