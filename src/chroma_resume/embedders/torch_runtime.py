"""FlagEmbedding's model run by torch: every GPU build, bfloat16 on a CPU, and the float32 reference
every other runtime and precision is checked against.

FlagEmbedding and torch are imported only inside `load_torch`, so a run with nothing to embed never
pays for them. The model is always loaded in float32; a reduced precision is an autocast around the
forward passes (fp16 on CUDA, bfloat16 on a CPU), so the float32 reference and the reduced path share
one loaded model and the probe check (probe.py) costs no second load.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np

from .. import models
from ..config import Config
from ..errors import ModelLoadError
from .base import CPU_BATCH, CUDA_BATCH, OnPass, length_batches

AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}  # precision -> torch dtype of the matrix products


class FlagEmbedder:
    """Encodes with a FlagEmbedding FlagModel's own tokenizer, network and pooling, normalized.

    We run the forward passes ourselves instead of calling `encode_corpus` because that
    method, called once per commit group, re-runs a batch-size probe (one extra forward
    pass per call: +12% at 256 chunks per group) and prints progress bars of its own.
    """

    def __init__(self, flag, name: str, batch_size: int, device: str, precision: str = "float32"):
        import torch

        self.torch = torch
        self.flag, self.name, self.batch_size, self.device = flag, name, batch_size, device
        self.precision = precision
        self.dim = flag.model.config.hidden_size  # cls and mean pooling keep the hidden size
        self.embedded = 0
        # We pad pre-tokenized batches on purpose (tokenizing once is the point); silence the hint.
        flag.tokenizer.deprecation_warnings["Asking-to-pad-a-fast-tokenizer"] = True

    def with_precision(self, precision: str) -> FlagEmbedder:
        """The same loaded model, its matrix products in `precision`; pooling and normalisation of
        their results stay float32."""
        return FlagEmbedder(self.flag, self.name, self.batch_size, self.device, precision)

    def _autocast(self):
        if self.precision == "float32":
            return contextlib.nullcontext()
        return self.torch.autocast(self.device.split(":")[0], dtype=getattr(self.torch, AUTOCAST[self.precision]))

    def encode(self, texts: Sequence[str], on_pass: OnPass | None = None) -> np.ndarray:
        """(len(texts), dim) float32, in the order given. The texts are tokenized once and
        batched by token count, so each batch pads only to its own longest text (character
        length mixes CJK, code and prose and roughly doubles the padding)."""
        torch, flag = self.torch, self.flag
        vectors = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return vectors
        tokens = flag.tokenizer(list(texts), truncation=True, max_length=flag.passage_max_length)
        with torch.inference_mode(), self._autocast():
            for picked in length_batches([len(ids) for ids in tokens["input_ids"]], self.batch_size):
                batch = flag.tokenizer.pad({k: [v[i] for i in picked] for k, v in tokens.items()},
                                           return_tensors="pt").to(self.device)
                hidden = flag.model(**batch, return_dict=True).last_hidden_state.float()
                pooled = flag.pooling(hidden, batch["attention_mask"])
                vectors[picked] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
                if on_pass:
                    on_pass(len(picked))
        self.embedded += len(texts)
        return vectors


def load_torch(c: Config) -> FlagEmbedder:
    """The model in float32 on --device. The preflight gives the location and the max length to use."""
    info = models.preflight(c)
    try:
        import torch
        from FlagEmbedding import FlagModel
    except ImportError as exc:
        raise ModelLoadError(f"FlagEmbedding is not importable ({exc}); install the project's dependencies") from None
    device = models.resolve_device(c.device, c.fp16, torch.cuda.device_count())
    batch = c.embed_batch or (CUDA_BATCH if device.startswith("cuda") else CPU_BATCH)
    try:
        flag = FlagModel(info.location, pooling_method=models.pooling(c), normalize_embeddings=True,
                         use_fp16=False, devices=device, batch_size=batch)
        flag.model.to(device).eval()
    except Exception as exc:  # any loader failure is the model's fault, not ours
        raise ModelLoadError(f"cannot load model {c.embed_model!r} from {info.location}: {exc}") from None
    flag.passage_max_length = info.max_length or flag.passage_max_length
    return FlagEmbedder(flag, c.embed_model, batch, device)


def gpu_name(device: str) -> str:
    """The CUDA device's name: a probe check holds for one kind of GPU (imports torch)."""
    import torch
    return torch.cuda.get_device_name(torch.device(device))
