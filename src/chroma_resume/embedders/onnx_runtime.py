"""ONNX Runtime on a CPU: the FlagEmbedding model exported once, checked against torch, then trusted.

Why: on a CPU without bfloat16 units the forward passes are the whole cost of a cold build, and
ONNX Runtime runs the same float32 network at least as fast as torch. The vectors must not change
(the backend is not part of the schema, and cached vectors are shared by both backends), so an
export is used only after the probe set (probe.py) embedded by both runtimes agrees to cosine >=
PROBE_MIN_COSINE; otherwise the build WARNs and keeps torch.

`--backend onnx-int8` quantizes that checked export (dynamic int8, per-channel weights, the MatMuls
only) into a folder of its own. Its vectors differ from the model's by design, so it is part of
the model's fingerprint (a schema change, its own cache entries) and has no torch fallback; its
check only proves the quantized graph is the same network (cosine >= INT8_MIN_COSINE to the
float32 export), and records how far it moved.

The export lives beside the embedding cache, in `onnx/<model fingerprint>.v<EXPORT_FORMAT>.ort<version>/`:
`model.onnx` (network + pooling + normalisation, so the graph returns the final vectors),
`tokenizer.json` (the exact fast tokenizer transformers built, so later runs tokenize alike
without importing transformers) and `meta.json`, written last, which records the check. A later
run that finds a passed check for its fingerprint and onnxruntime version imports neither torch
nor transformers. `flock` on `<folder>.lock` makes two builds export once between them.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import time
from collections.abc import Iterator, Sequence

import msgspec
import numpy as np

from .. import config as cfg
from ..cache import cache_path
from .. import failpoints, models, osfs
from ..config import Config
from ..errors import ModelLoadError, RuntimeFailure
from . import torch_runtime
from .base import CPU_BATCH, OnPass, length_batches
from .probe import PROBES, probe_cosines

EXPORT_FORMAT = 2  # bump when the exported graph or the files beside it change meaning (2: sha256 in meta.json)
EXPORT_FILES = ("model.onnx", "tokenizer.json")  # what meta.json's digests cover
PROBE_MIN_COSINE = 0.99999
# int8 moves a MiniLM vector by ~1 % (measured: least cosine 0.977, mean 0.991 over the benchmark
# corpus, 0.982 on the probes); per-tensor weights fell to 0.82. Below this, it is not the network
# the user asked for.
INT8_MIN_COSINE = 0.95
OPSET = 17
# The machine's fault, not the model's (onnx not installed, a read-only or full disk): WARNed, the
# build runs torch, and the next build tries again; nothing is remembered.
_TRANSIENT = (ImportError, OSError, RuntimeFailure)
_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


class ExportMeta(msgspec.Struct, kw_only=True):
    """meta.json: what was exported, for which runtime, and what the probe check found."""
    format: int
    fingerprint: str
    runtime: str  # onnxruntime major.minor the check ran on: another one re-checks
    dim: int
    max_length: int
    input_names: list[str]
    pad_ids: dict[str, int]  # per input: the value the transformers tokenizer pads it with
    padding_side: str
    onnx_bytes: int
    passed: bool
    worst_cosine: float | None  # None: no check ran (the export failed)
    cause: str = ""  # why it is not used (a failed check or export)
    quantization: str = ""  # models.REDUCED_PRECISION's words for a quantized export; "" for float32
    sha256: dict[str, str] = {}  # EXPORT_FILES -> digest when the check passed, compared on every load
    versions: dict[str, str] = {}
    export_sec: float = 0.0
    check_sec: float = 0.0


class OnnxEmbedder:
    """Same contract as FlagEmbedder: float32 unit vectors in the order given, token-length batches."""

    def __init__(self, session, tokenizer, meta: ExportMeta, batch_size: int, name: str):
        self.session, self.tokenizer, self.meta = session, tokenizer, meta
        self.batch_size, self.name, self.dim = batch_size, name, meta.dim
        self.precision = "int8" if meta.quantization else "float32"
        self.embedded = 0

    def encode(self, texts: Sequence[str], on_pass: OnPass | None = None) -> np.ndarray:
        vectors = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return vectors
        encodings = self.tokenizer.encode_batch(list(texts))  # truncation at max_length is set on it
        lengths = [len(e.ids) for e in encodings]
        for picked in length_batches(lengths, self.batch_size):
            vectors[picked] = self.session.run(None, self._feeds([encodings[i] for i in picked]))[0]
            if on_pass:
                on_pass(len(picked))
        self.embedded += len(texts)
        return vectors

    def _feeds(self, encodings: list) -> dict[str, np.ndarray]:
        """Pad as transformers' tokenizer.pad does: to the batch's longest, on the model's side."""
        meta = self.meta
        width = max(len(e.ids) for e in encodings)
        feeds = {n: np.full((len(encodings), width), meta.pad_ids[n], dtype=np.int64) for n in meta.input_names}
        for row, e in enumerate(encodings):
            span = slice(0, len(e.ids)) if meta.padding_side == "right" else slice(width - len(e.ids), width)
            for name in meta.input_names:
                feeds[name][row, span] = getattr(e, _FIELDS[name])
        return feeds


# ---- where and whether ---------------------------------------------------------------

def export_dir(c: Config) -> str:
    """Beside the embedding cache (the state root when the cache is off), one folder per model
    fingerprint: the fingerprint covers the model's files, pooling, max length and precision."""
    base = cfg.path(c, c.state_root) if c.embed_cache == "off" else os.path.dirname(cache_path(c))
    name = re.sub(r"[^\w.@-]", "_", models.model_fingerprint(c))
    # Per onnxruntime version too: two installs sharing a state root would otherwise export over each other.
    return os.path.join(base, "onnx", f"{name}.v{EXPORT_FORMAT}.ort{runtime_version()}")


def runtime_version() -> str:
    return models.package_version("onnxruntime", 2)


def read_meta(folder: str, fingerprint: str, warn=None) -> ExportMeta | None:
    """The recorded export and check, or None when it must be (re)made: missing or unreadable,
    another format, fingerprint or onnxruntime version, or files that are not the ones checked
    (WARNed through `warn`: a damaged export is news, a missing one is not)."""
    try:
        with open(os.path.join(folder, "meta.json"), "rb") as fh:
            meta = msgspec.json.decode(fh.read(), type=ExportMeta)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    if (meta.format, meta.fingerprint, meta.runtime) != (EXPORT_FORMAT, fingerprint, runtime_version()):
        return None
    damage = _damage(folder, meta) if meta.passed else ""
    if damage:
        if warn is not None:
            warn("onnx_export_damaged", folder=folder, cause=damage, fix="--backend onnx or onnx-int8 makes it again")
        return None
    return meta


def _damage(folder: str, meta: ExportMeta) -> str:
    """Why the files are not the ones the check passed, or "". Hashed on every load (86 MB: ~0.1 s,
    a fraction of what ONNX Runtime reads next): a bit flipped in the weights keeps the file's
    size and still parses, and would be trusted for every later build and by verify --deep."""
    for name in EXPORT_FILES:
        got = _sha256(os.path.join(folder, name))
        if got != meta.sha256.get(name):
            return f"{name}: sha256 {got or 'unreadable'} is not the recorded {meta.sha256.get(name) or 'none'}"
    return ""


# Digests of export files hashed in this process, by stat: a build checks the int8 export before it
# acts (embedders.prepare) and again when it loads it, and pays for the hash once.
_DIGESTS: dict = {}


def _sha256(path: str) -> str:
    """"" for a file that cannot be read: damage like any other."""
    try:
        return models.file_digest(path, _DIGESTS)
    except OSError:
        return ""


def exported(c: Config) -> bool:
    """A checked, intact export of this model (float32, or int8 under --backend onnx-int8: its own
    fingerprint, its own folder) is on disk."""
    meta = read_meta(export_dir(c), models.model_fingerprint(c))
    return meta is not None and meta.passed


def load(c: Config, warn):
    """The checked ONNX embedder for a CPU build, exporting and checking it first if needed;
    the torch embedder (after a WARN) when the export cannot be made or did not pass."""
    if c.backend == "onnx-int8":
        return _load_quantized(c, warn)
    folder, fingerprint = export_dir(c), models.model_fingerprint(c)
    batch = c.embed_batch or CPU_BATCH
    try:
        meta = read_meta(folder, fingerprint, warn)
        if meta is None and c.backend == "auto":
            return torch_runtime.load_torch(c)  # auto never pays for an export: --backend onnx makes one
        if meta is None:
            with export_lock(folder):
                meta = read_meta(folder, fingerprint)  # another build may have made it while we waited
                if meta is None:
                    return _export_and_check(c, folder, fingerprint, batch, warn)
        if meta.passed:
            return open_embedder(folder, meta, batch, c.embed_model)
        cause = meta.cause
    except _TRANSIENT as exc:
        cause = f"{type(exc).__name__}: {exc}"
    warn("onnx_backend_unused", folder=folder, cause=cause, fallback="torch")
    return torch_runtime.load_torch(c)


@contextlib.contextmanager
def export_lock(folder: str) -> Iterator[None]:
    """A lock on <folder>.lock; waits for another build's export (the OS frees it if that build dies).
    Holding it, no one else writes the folder: a killed export's temp files are swept here."""
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with osfs.exclusive_lock(f"{folder}.lock", on_busy=lambda: failpoints.fire("onnx.export", "wait")):
        for leftover in glob.glob(os.path.join(glob.escape(folder), "*.tmp.*")):
            osfs.unlink(leftover)
        yield


def open_embedder(folder: str, meta: ExportMeta, batch: int, name: str) -> OnnxEmbedder:
    """An ONNX Runtime session on every core of this process, graph optimisations all on."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = osfs.usable_cpus()
    options.inter_op_num_threads = 1
    # Idle workers sleep instead of spinning: the build's writer thread (Chroma upserts) and other
    # processes share these cores; measured: ~10 % less CPU for the same encode, same wall time.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its optimizer's notes are not the user's business
    try:
        session = ort.InferenceSession(os.path.join(folder, "model.onnx"), options,
                                       providers=["CPUExecutionProvider"])
        tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    except Exception as exc:  # noqa: BLE001 - their errors are many; each means this export cannot run here
        raise RuntimeFailure(f"cannot open the export in {folder}: {type(exc).__name__}: {exc}") from None
    tokenizer.no_padding()
    tokenizer.enable_truncation(meta.max_length)
    return OnnxEmbedder(session, tokenizer, meta, batch, name)


# ---- export and check (torch is loaded here only) ------------------------------------

def _export_and_check(c: Config, folder: str, fingerprint: str, batch: int, warn):
    reference = torch_runtime.load_torch(c)
    flag = reference.flag
    failpoints.fire("onnx.export", "begin")
    os.makedirs(folder, exist_ok=True)
    names = [n for n in flag.tokenizer.model_input_names if n in _FIELDS]
    t0 = time.perf_counter()
    try:
        if not flag.tokenizer.is_fast:
            raise ModelLoadError("the model has no fast (Rust) tokenizer to save beside the export")
        _export_graph(flag, names, os.path.join(folder, "model.onnx"))
        osfs.atomic_write(os.path.join(folder, "tokenizer.json"), flag.tokenizer.backend_tokenizer.to_str().encode())
    except _TRANSIENT:
        raise
    except Exception as exc:  # the model's graph does not export: remember it, do not retry every run
        meta = _meta(flag, fingerprint, names, folder, passed=False, worst=None,
                     cause=f"export failed: {type(exc).__name__}: {exc}")
        osfs.atomic_write(os.path.join(folder, "meta.json"), msgspec.json.encode(meta))
        warn("onnx_backend_unused", folder=folder, cause=meta.cause, fallback="torch")
        return reference
    export_sec = time.perf_counter() - t0
    meta = _meta(flag, fingerprint, names, folder, passed=False, worst=None)
    candidate = open_embedder(folder, meta, batch, c.embed_model)
    t1 = time.perf_counter()
    worst = float(probe_cosines(candidate, reference).min())
    passed = worst >= PROBE_MIN_COSINE
    cause = "" if passed else f"probe check: worst cosine {worst:.7f} < {PROBE_MIN_COSINE}"
    meta = msgspec.structs.replace(meta, passed=passed, worst_cosine=worst, cause=cause, export_sec=export_sec,
                                   check_sec=time.perf_counter() - t1, sha256=_digests(folder))
    osfs.atomic_write(os.path.join(folder, "meta.json"), msgspec.json.encode(meta))  # the commit point
    failpoints.fire("onnx.export", "done")
    if not passed:
        warn("onnx_backend_unused", folder=folder, cause=cause, fallback="torch")
        return reference
    candidate.meta = meta
    return candidate


# ---- int8 (onnxruntime.quantization, which needs `onnx`) -------------------------------

def _load_quantized(c: Config, warn) -> OnnxEmbedder:
    """The checked int8 export, made from the checked float32 one if needed. No fallback: a float32
    vector under an int8 fingerprint would be a lie, so a failure is ModelLoadError (exit 2)."""
    folder, meta = quantized_export(c, warn)
    try:
        # One text per forward pass, whatever --embed-batch says: dynamic quantization scales each
        # activation tensor by its own range, so in a batch a text's vector would depend on the texts
        # beside it (measured: cosine 0.98 between batch 32 and alone), and verify --deep, a resume or
        # the cache could never agree with it. Alone it is a function of its text; and no slower here
        # (200 chunks: 4.3-4.5 s alone, 5.0 s in batches of 32, which pad).
        return open_embedder(folder, meta, 1, c.embed_model)
    except RuntimeFailure as exc:
        raise ModelLoadError(f"--backend {c.backend}: {exc}") from None


def quantized_export(c: Config, warn) -> tuple[str, ExportMeta]:
    """(folder, meta) of the checked int8 export, made now if missing or damaged; ModelLoadError
    (exit 2) if it cannot be made or failed its check. A build calls it before its first act."""
    folder, fingerprint = export_dir(c), models.model_fingerprint(c)
    try:
        meta = read_meta(folder, fingerprint, warn)
        if meta is None:
            with export_lock(folder):
                meta = read_meta(folder, fingerprint)
                if meta is None:
                    meta = _quantize_and_check(c, folder, fingerprint, warn)
    except _TRANSIENT as exc:
        raise ModelLoadError(f"--backend {c.backend}: cannot make the export in {folder}: "
                             f"{type(exc).__name__}: {exc}") from None
    if not meta.passed:
        raise ModelLoadError(f"--backend {c.backend}: {meta.cause} ({os.path.join(folder, 'meta.json')}); use "
                             f"--backend onnx or torch, or delete that folder to try again")
    return folder, meta


def _quantize_and_check(c: Config, folder: str, fingerprint: str, warn) -> ExportMeta:
    """Quantize the checked float32 export, then embed the probes with both: the float32 export
    stands in for torch here, since its own check put it within PROBE_MIN_COSINE of it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    base = load(msgspec.structs.replace(c, backend="onnx"), warn)
    if not isinstance(base, OnnxEmbedder):
        raise ModelLoadError(f"--backend {c.backend} quantizes the checked float32 export, which this model "
                             f"does not have (see the WARN onnx_backend_unused above)")
    base_folder = export_dir(msgspec.structs.replace(c, backend="onnx"))
    failpoints.fire("onnx.quantize", "begin")
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, "model.onnx")
    tmp = f"{target}.tmp.{os.getpid()}"
    meta = msgspec.structs.replace(base.meta, fingerprint=fingerprint, passed=False, worst_cosine=None, sha256={},
                                   quantization=models.REDUCED_PRECISION[c.backend], check_sec=0.0)
    t0 = time.perf_counter()
    try:
        # MatMuls with constant weights only: quantizing attention's activation x activation
        # products (and the embedding tables) moved vectors to cosine ~0.82 in our measurement.
        with _quiet_root_logger():  # its advice to pre-process is for image models, not the user's business
            quantize_dynamic(os.path.join(base_folder, "model.onnx"), tmp, weight_type=QuantType.QInt8,
                             per_channel=True, op_types_to_quantize=["MatMul"],
                             extra_options={"MatMulConstBOnly": True})
        osfs.sync_and_replace(tmp, target)  # its bytes on disk before meta.json, written after, names them
    except _TRANSIENT:
        raise
    except Exception as exc:  # the graph does not quantize: remember it, do not retry every run
        meta = msgspec.structs.replace(meta, onnx_bytes=-1, cause=f"quantization failed: {type(exc).__name__}: {exc}")
        osfs.atomic_write(os.path.join(folder, "meta.json"), msgspec.json.encode(meta))
        return meta
    finally:
        with contextlib.suppress(OSError):
            osfs.unlink(tmp)
    with open(os.path.join(base_folder, "tokenizer.json"), "rb") as fh:
        osfs.atomic_write(os.path.join(folder, "tokenizer.json"), fh.read())
    meta = msgspec.structs.replace(meta, onnx_bytes=_size(target), export_sec=time.perf_counter() - t0)
    candidate = open_embedder(folder, meta, 1, c.embed_model)  # one text per pass, as _load_quantized runs it
    t1 = time.perf_counter()
    worst = float(probe_cosines(candidate, base).min())
    passed = worst >= INT8_MIN_COSINE
    meta = msgspec.structs.replace(meta, passed=passed, worst_cosine=worst, check_sec=time.perf_counter() - t1,
                                   sha256=_digests(folder),
                                   cause="" if passed else f"probe check: worst cosine {worst:.4f} to the float32 "
                                                           f"export < {INT8_MIN_COSINE}")
    osfs.atomic_write(os.path.join(folder, "meta.json"), msgspec.json.encode(meta))  # the commit point
    failpoints.fire("onnx.quantize", "done")
    return meta


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    import logging
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _export_graph(flag, names: list[str], target: str) -> None:
    """The network, the model's pooling and the L2 normalisation as one graph with dynamic batch
    and sequence axes (the legacy TorchScript exporter: it needs `onnx`, not `onnxscript`)."""
    import warnings

    import torch

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = flag.model

        def forward(self, *inputs):
            given = dict(zip(names, inputs))
            hidden = self.model(**given, return_dict=True).last_hidden_state
            return torch.nn.functional.normalize(flag.pooling(hidden, given["attention_mask"]).float(), dim=-1)

    # Two texts of different lengths, so the traced graph pads and masks as a real batch does.
    sample = flag.tokenizer(list(PROBES[:2]), padding=True, truncation=True, max_length=flag.passage_max_length,
                            return_tensors="pt")
    tmp = f"{target}.tmp.{os.getpid()}"
    wrapper = Pooled().eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and deprecation notes about the legacy exporter
            torch.onnx.export(wrapper, tuple(sample[n] for n in names), tmp, dynamo=False, opset_version=OPSET,
                              input_names=names, output_names=["vector"],
                              dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "vector": {0: "batch"}})
        osfs.sync_and_replace(tmp, target)  # its bytes on disk before meta.json, written after, names them
    except BaseException:  # an interrupted or failed export leaves no 90 MB half-file behind
        with contextlib.suppress(OSError):
            osfs.unlink(tmp)
        raise
    finally:
        flag.model.eval()  # the exporter restores the wrapper's mode, recursively


def _meta(flag, fingerprint: str, names: list[str], folder: str, *, passed: bool, worst: float | None,
          cause: str = "") -> ExportMeta:
    tokenizer = flag.tokenizer
    pads = {"input_ids": tokenizer.pad_token_id or 0, "attention_mask": 0,
            "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0)}
    return ExportMeta(format=EXPORT_FORMAT, fingerprint=fingerprint, runtime=runtime_version(),
                      dim=flag.model.config.hidden_size, max_length=flag.passage_max_length, input_names=names,
                      pad_ids={n: pads[n] for n in names}, padding_side=tokenizer.padding_side,
                      onnx_bytes=_size(os.path.join(folder, "model.onnx")), passed=passed, worst_cosine=worst,
                      cause=cause, versions=_versions())


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    found = {}
    for name in ("onnxruntime", "onnx", "torch", "transformers", "tokenizers", "FlagEmbedding"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def _digests(folder: str) -> dict[str, str]:
    return {name: _sha256(os.path.join(folder, name)) for name in EXPORT_FILES}


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1
