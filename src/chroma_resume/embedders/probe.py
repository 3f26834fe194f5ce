"""One probe check for every runtime and precision: embed a fixed probe set both ways, compare.

A faster path is trusted only after it agrees with the float32 torch model on these probes: the
ONNX export (onnx_runtime.PROBE_MIN_COSINE, recorded in its meta.json), its int8 quantization
(against the float32 export), and a reduced precision of torch (bf16 on a CPU, fp16 on CUDA), whose
vectors share the float32 schema and cache, so they must stay within PRECISION_MIN_COSINE.

A precision check holds for one model identity on one kind of machine (CPU model and flags, or GPU
name) with one torch: it is recorded in `<state-root>/precision-checks.json` (written atomically,
like the model digests beside it) and not run again; a refused precision is remembered too and
WARNed on every load, which then runs float32.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import time

import msgspec
import numpy as np

from .. import config as cfg
from .. import failpoints, models, osfs
from ..config import Config
from ..errors import ModelLoadError

# float32, fp16 and bf16 vectors of one model are one schema only while they agree this closely.
# Measured (MiniLM, benchmark corpus): bf16 least 0.99994, mean 0.99998; verify --deep compares
# at a looser 0.999 by default, so vectors of any trusted precision pass it.
PRECISION_MIN_COSINE = 0.9999
# --backend auto takes a reduced precision for speed, so it must also be faster where it runs: on a Xeon
# with AVX-512 BF16 and no AMX, bfloat16 measured ~1.4x slower than float32 (design notes, issue 22).
# Reduced seconds / float32 seconds on the probes, at most, for auto to prefer it.
FASTER_THAN = 0.9
RECORD_NAME = "precision-checks.json"

# What the check must see: prose, CJK, code, a table, very short texts and texts cut at the
# max length, embedded together so the batches pad (and the padding is masked) as in a build.
PROBES = (
    "The printing press spread quickly across Europe, and with it the habit of reading silently.",
    "A write-ahead log records every change before it is applied, so a crash can be replayed to a "
    "consistent state; the log is cut back to its last intact record when the tail is torn.",
    "预写式日志在修改数据之前先把变更记录下来，崩溃之后可以重放日志恢复到一致的状态。",
    "向量索引把文本切成块，每一块都交给模型计算嵌入。日本語の文章も少し混ぜておきます。한국어 문장도 있습니다.",
    "def flush(buffer, size):\n    batch = [buffer.popleft() for _ in range(min(size, len(buffer)))]\n    return batch\n",
    "SELECT key, dim, vector FROM vectors WHERE key IN (?, ?, ?) ORDER BY last_used DESC LIMIT 500;",
    "| option | default | meaning |\n|---|---|---|\n| --embed-batch | 32 | texts per forward pass |",
    "Short.",
    "索引",
    "A long paragraph about rivers, harbors and lanterns, written to run past the model's window. " * 30,
    "长文本：模型只看得到前面的若干个词元，后面的部分会被截断，所以两种运行时必须在同一处截断。" * 12,
    "for (int i = 0; i < n; ++i) { total += values[i] * weights[i]; } // accumulate\n" * 25,
)


def probe_cosines(candidate, reference, seconds: dict | None = None) -> np.ndarray:
    """Cosine of each probe's vector from both embedders (both return unit vectors); neither
    embedder's `embedded` count keeps the probes (they are not the build's work). With `seconds`,
    each embedder is warmed up on two probes first and its pass over all of them timed into it
    ("candidate", "reference")."""
    counts = candidate.embedded, reference.embedded
    if seconds is not None:
        candidate.encode(PROBES[:2]), reference.encode(PROBES[:2])
    (want, seconds_reference), (got, seconds_candidate) = timed_encode(reference), timed_encode(candidate)
    if seconds is not None:
        seconds.update(candidate=seconds_candidate, reference=seconds_reference)
    candidate.embedded, reference.embedded = counts
    if failpoints.enabled("bug.onnx_probe_mismatch"):  # planted: one probe's vector comes back permuted
        got[-1] = np.roll(got[-1], 1)
    return np.einsum("ij,ij->i", got.astype(np.float64), want.astype(np.float64))


def timed_encode(embedder) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    vectors = embedder.encode(PROBES)
    return vectors, time.perf_counter() - t0


class PrecisionCheck(msgspec.Struct, kw_only=True):
    """One entry of precision-checks.json: what the probes found, and when. `passed`: every probe
    within PRECISION_MIN_COSINE; the seconds are one pass over the probes each, after a warm-up."""
    passed: bool
    worst_cosine: float
    mean_cosine: float
    probes: int
    float32_sec: float
    reduced_sec: float
    checked_at: str

    @property
    def faster(self) -> bool:
        return self.reduced_sec <= FASTER_THAN * self.float32_sec


def record_path(c: Config) -> str:
    return os.path.join(cfg.path(c, c.state_root), RECORD_NAME)


def read_records(c: Config) -> dict[str, PrecisionCheck]:
    """The recorded checks of this state root; {} when there are none or the file is unreadable
    (the checks are then made again: they are evidence, not state)."""
    try:
        with open(record_path(c), "rb") as fh:
            return msgspec.json.decode(fh.read(), type=dict[str, PrecisionCheck])
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return {}


def check_key(c: Config, precision: str, machine: str) -> str:
    """One check per model identity, precision, kind of machine and torch major.minor; read without torch."""
    return f"{models.model_fingerprint(c)} | {precision} | {machine} | torch {models.package_version('torch', 2)}"


def recorded(c: Config, precision: str, machine: str) -> PrecisionCheck | None:
    """The recorded check, if any; None for a model that cannot be found (it has no identity, and the
    read-only commands that describe it must not fail on that)."""
    try:
        return read_records(c).get(check_key(c, precision, machine))
    except ModelLoadError:
        return None


def trusted_precision(c: Config, float32, precision: str, machine: str, warn, *, must_be_faster: bool):
    """`float32` (a FlagEmbedder) in `precision` if its probe check passed (made now when not recorded
    for this model, machine and torch) and, when `must_be_faster` (--backend auto), it ran the probes
    faster; else float32 itself: after a WARN naming the worst cosine, or, for speed, a WARN when
    first measured (later builds say it in their [CONFIG] line)."""
    key = check_key(c, precision, machine)
    check = read_records(c).get(key)
    reduced = float32.with_precision(precision)
    measured_now = check is None
    if check is None:
        seconds: dict = {}
        cosines = probe_cosines(reduced, float32, seconds)
        check = PrecisionCheck(passed=bool(cosines.min() >= PRECISION_MIN_COSINE), worst_cosine=float(cosines.min()),
                               mean_cosine=float(cosines.mean()), probes=len(cosines),
                               float32_sec=seconds["reference"], reduced_sec=seconds["candidate"],
                               checked_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        _record(c, key, check)
    if not check.passed:
        warn("precision_refused", precision=precision, machine=machine, worst_cosine=f"{check.worst_cosine:.6f}",
             cause=f"a probe's {precision} vector is below cosine {PRECISION_MIN_COSINE} to float32 "
                   f"(recorded in {record_path(c)})", fallback="float32")
        return float32
    if must_be_faster and not check.faster:
        if measured_now:
            warn("precision_not_faster", precision=precision, machine=machine,
                 cause=f"{precision} took {check.reduced_sec / check.float32_sec:.2f}x float32's time on the probes "
                       f"(recorded in {record_path(c)})", fallback="float32")
        return float32
    return reduced


def _record(c: Config, key: str, check: PrecisionCheck) -> None:
    """Add one check to the record, atomically. Re-read first: another build may have added its own.
    A state root that cannot be written, or does not exist (a read-only command creates nothing),
    costs only a repeated check next time."""
    records = {**read_records(c), key: check}
    if os.path.isdir(os.path.dirname(record_path(c))):
        with contextlib.suppress(OSError):
            osfs.atomic_write(record_path(c), msgspec.json.encode(records))
