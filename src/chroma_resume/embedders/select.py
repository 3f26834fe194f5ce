"""Which embedder a configuration runs, and the checks it passes first: the one place that decides.

`--backend auto` is the fastest checked path: fp16 on CUDA; bfloat16 on a CPU that computes it
natively (amx_bf16 or avx512_bf16 among its flags); otherwise float32, through the checked ONNX
export where one exists, else torch. `--backend torch` is float32 torch, the reference a user can
always ask for (fp16 only with an explicit --fp16 on). A reduced precision is used only after its
probe check passed on this kind of machine (probe.trusted_precision), else float32 after a WARN; and
under auto only where that check also found it faster than float32.
`choose` reads options and CPU flags only, without torch, so the [CONFIG] line can name what will
run and why before anything is loaded.
"""
from __future__ import annotations

import re

import msgspec

from .. import models
from ..config import Config
from ..reporting import Warnings
from . import onnx_runtime, probe, torch_runtime
from .hash_standin import HashEmbedder

CPU_INFO = "/proc/cpuinfo"
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


class Choice(msgspec.Struct, frozen=True):
    """What runs: `runtime` torch, onnx (the checked float32 export; under --backend auto, torch when
    none was made), onnx-int8 or hash; `precision` float32, bf16, fp16 or int8; and why."""
    runtime: str
    precision: str
    why: str


def choose(c: Config) -> Choice:
    """The embedder these options ask for on this machine, decided without torch."""
    if models.is_stand_in(c):
        return Choice("hash", "float32", "the hash stand-in")
    cuda = c.device.startswith("cuda")
    if c.backend == "onnx-int8":
        return Choice("onnx-int8", "int8", "--backend onnx-int8 (a schema of its own)")
    if c.backend == "onnx":
        return Choice("onnx", "float32", "--backend onnx: the float32 export, checked against torch")
    if c.backend == "torch-bf16":
        return Choice("torch", "bf16", "--backend torch-bf16, checked against float32 on the probes")
    if c.backend == "torch":
        if cuda and c.fp16 == "on":
            return Choice("torch", "fp16", "--backend torch --fp16 on, checked against float32 on the probes")
        return Choice("torch", "float32", "--backend torch: the float32 reference")
    if c.fp16 == "off":
        return Choice("torch" if cuda else "onnx", "float32", "--fp16 off: float32")
    if cuda:
        return Choice("torch", "fp16", "a CUDA device: fp16, checked against float32 on the probes")
    evidence = bf16_evidence()
    if evidence:
        return Choice("torch", "bf16", f"this CPU computes bfloat16 ({evidence}): bf16, checked against float32 "
                                       f"on the probes")
    return Choice("onnx", "float32", f"no bfloat16 units on this CPU (none of {', '.join(BF16_FLAGS)}): float32, "
                                     f"the checked ONNX export where one exists, else torch")


def settled(c: Config) -> Choice:
    """`choose`, corrected by what this CPU's recorded probe check found: where auto's bf16 ran the
    probes no faster than float32, auto is float32 (the checked ONNX export where one exists, else
    torch), decided without loading torch; before any check is recorded, the [CONFIG] line says that
    the check decides (it runs at the first embedding, not before). A bf16 check that failed on cosine
    is left to the load, which WARNs about it every time."""
    choice = choose(c)
    if c.backend == "auto" and choice.precision == "bf16":
        check = probe.recorded(c, "bf16", machine_kind(c.device))
        if check is None:
            return Choice("torch", "bf16", f"{choice.why}, if its probe check at the first embedding also "
                                           f"finds it faster; else float32")
        if check.passed and not check.faster:
            return Choice("onnx", "float32", f"bf16 took {check.reduced_sec / check.float32_sec:.2f}x float32's "
                                             f"time in this CPU's probe check ({probe.record_path(c)}): float32, "
                                             f"the checked ONNX export where one exists, else torch")
    return choice


def describe(c: Config) -> str:
    """What runs and why, for the [CONFIG] line."""
    choice = settled(c)
    return f"{choice.runtime}/{choice.precision} ({choice.why})"


def load(c: Config, warn=None):
    """The embedder `settled` names, loaded and checked, or ModelLoadError (exit 2) naming the model.
    A build has run the same preflight before writing anything."""
    warn = warn or Warnings()
    choice = settled(c)
    if choice.runtime == "hash":
        return HashEmbedder(models.preflight(c).dim)
    if choice.runtime in ("onnx", "onnx-int8"):
        return onnx_runtime.load(c, warn)
    float32 = torch_runtime.load_torch(c)
    if choice.precision == "float32":
        return float32
    return probe.trusted_precision(c, float32, choice.precision, machine_kind(float32.device), warn,
                                   must_be_faster=c.backend == "auto")


def needs_transformers(c: Config) -> bool:
    """Whether this configuration's embedder loads through transformers (torch): not the stand-in, not
    a checked ONNX export on disk (ONNX Runtime and its tokenizer.json, proven when it was made). A build
    proves a transformers model loadable before it acts (models.check_loadable) only then, so a no-op
    build over an ONNX export imports neither torch nor transformers."""
    if models.is_stand_in(c):
        return False
    return not (settled(c).runtime in ("onnx", "onnx-int8") and onnx_runtime.exported(c))


def prepare(c: Config, warn) -> None:
    """What must exist before a build's first act. The model loads lazily (a no-op build never pays
    for it), but --backend onnx-int8 has no fallback: its export is made, or refused with exit 2,
    now, rather than at the first cache miss after a schema reset had emptied the collection. And a
    bfloat16 build asked of a CPU without bfloat16 units is said before it starts."""
    if models.is_stand_in(c):
        return
    if c.backend == "onnx-int8":
        onnx_runtime.quantized_export(c, warn)
    if c.backend == "torch-bf16" and not bf16_evidence():
        warn("bf16_not_native", cpu=CPU_INFO, cause=f"none of {', '.join(BF16_FLAGS)} among the CPU's flags: "
             f"bfloat16 is emulated here, slower than float32", fix="--backend auto")


def cpu_flags() -> set[str] | None:
    """The CPU's flags from Linux's /proc/cpuinfo; None where it cannot be read (another OS)."""
    try:
        with open(CPU_INFO, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    found = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return set(found.group(1).split()) if found else set()


def bf16_evidence() -> str | None:
    """What shows that this CPU computes bfloat16 itself: a flag (amx_bf16, avx512_bf16), or, where the
    flags cannot be read, torch's CPU capability when it names AMX or BF16 (imports torch). None: no
    evidence, so --backend auto stays float32."""
    flags = cpu_flags()
    if flags is not None:
        return next((flag for flag in BF16_FLAGS if flag in flags), None)
    import torch
    capability = torch.backends.cpu.get_cpu_capability()
    return f"torch CPU capability {capability}" if re.search("AMX|BF16", capability, re.IGNORECASE) else None


def machine_kind(device: str) -> str:
    """What a precision check holds for: the GPU's name, or the CPU's model name and vector flags."""
    if device.startswith("cuda"):
        return f"cuda {torch_runtime.gpu_name(device)}"
    try:
        with open(CPU_INFO, encoding="utf-8", errors="replace") as fh:
            found = re.search(r"^model name\s*:(.*)$", fh.read(), re.MULTILINE)
    except OSError:
        found = None
    vector = sorted(flag for flag in cpu_flags() or () if flag.startswith(("amx", "avx512")))
    return f"cpu {found.group(1).strip() if found else 'unknown'} [{' '.join(vector)}]"
