"""One exception tree; each class carries the process exit code of DESIGN §7.

    ChromaResumeError            (exit 1)  base; never raised directly
    ├── CheckFailed              (exit 1)  verify or strict sync found a mismatch
    ├── UsageError               (exit 2)  bad option, bad or missing input, corrupt manifest
    │   ├── ModelLoadError       (exit 2)  model path missing or unloadable
    │   └── NewerState           (exit 2)  a manifest written by a newer chroma-resume
    ├── LockHeld                 (exit 3)  another writer holds writer.lock
    ├── WalCorrupt               (exit 4)  WAL damaged before its tail, newer version, or unusable
    ├── RuntimeFailure           (exit 5)  Chroma unreachable after retries, disk full, I/O error
    │   └── StoreCorrupt         (exit 5)  Chroma's files cannot be read (e.g. segments emptied by a power cut)
    └── Interrupted              (exit 130) SIGINT/SIGTERM after the in-flight batch was logged

Exit 5 is our addition to DESIGN §7: a run that failed for reasons outside the
input (the store, the disk) must not look like a failed check (1) to CI.
"""


class ChromaResumeError(Exception):
    exit_code = 1


class CheckFailed(ChromaResumeError):
    exit_code = 1


class UsageError(ChromaResumeError):
    exit_code = 2


class ModelLoadError(UsageError):
    pass


class NewerState(UsageError):
    """Not corrupt and not ours to set aside: its fields may mean what this version cannot know.
    verify cannot check against it (exit 2), rather than fail it with a fix that would discard it."""


class LockHeld(ChromaResumeError):
    exit_code = 3


class WalCorrupt(ChromaResumeError):
    exit_code = 4


class RuntimeFailure(ChromaResumeError):
    exit_code = 5


class StoreCorrupt(RuntimeFailure):
    """Waiting cannot fix it, rebuilding can: never retried, reported once with the fix."""


class Interrupted(ChromaResumeError):
    exit_code = 130
