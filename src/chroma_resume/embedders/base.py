"""What every embedder is (one protocol) and how every one of them batches.

An embedder turns texts into float32 unit vectors, in the order given, and counts what it embedded
(the tests and the build summary read `embedded`). `precision` names what its matrix products run
in: float32, bf16, fp16 or int8. float32, bf16 and fp16 of one model are one schema (their vectors
agree within probe.PRECISION_MIN_COSINE, checked before a reduced precision is trusted); int8 is a
model identity of its own (models.model_fingerprint).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np

# Texts per forward pass when --embed-batch is not given: a GPU needs large batches to be busy
# (and token-length batching keeps their padding small); a CPU gains nothing past ~32.
CPU_BATCH, CUDA_BATCH = 32, 256

OnPass = Callable[[int], None]


class Embedder(Protocol):
    name: str
    dim: int
    precision: str
    embedded: int

    def encode(self, texts: Sequence[str], on_pass: OnPass | None = None) -> np.ndarray:
        """on_pass(n) after each forward pass of n texts: progress moves while the model works
        (an upsert batch is several passes, minutes for a large model)."""
        ...


def length_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indexes by descending token count, batch_size at a time: each batch pads only to its own
    longest text. Every backend batches through here, so they pad (and round) alike."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for lo in range(0, len(order), batch_size):
        yield order[lo:lo + batch_size]
