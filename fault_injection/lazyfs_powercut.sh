#!/bin/bash
# A real power cut (page-cache loss) during an incremental build, on a LazyFS mount you run yourself.
# Not part of CI. LazyFS (github dsrhaslab/lazyfs) builds with Debian's g++ cmake libfuse3-dev fuse3
# libtoml11-dev libspdlog-dev once its CMakeLists use find_package(toml11) / find_package(spdlog)
# instead of FetchContent; mount it with a [faults] fifo_path and its log sent to a file.
#
#   LAZYFS_MNT=/tmp/lzmnt LAZYFS_FIFO=/tmp/faults.fifo LAZYFS_LOG=/tmp/lazyfs.log \
#     fault_injection/lazyfs_powercut.sh [python]
#
# Build 1 (~2,000 chunks, stand-in embedder), half the corpus edited, build 2 killed late (its index files
# re-written, not fsynced), `lazyfs::clear-cache` (unsynced data dropped), then the rerun and verify.
# What must hold: the cache keeps every vector computed before the cut, the rerun finds the index behind
# chroma.sqlite3 (store_set_aside=...), rebuilds with 0 model calls, and verify exits 0.
set -euo pipefail
PY=${1:-python}
: "${LAZYFS_MNT:?mount point of LazyFS}" "${LAZYFS_FIFO:?its faults fifo}" "${LAZYFS_LOG:?its log file}"
W=$LAZYFS_MNT/powercut.$$
C=$(mktemp -d)/corpus  # the corpus lives off LazyFS: the cut must not touch it
mkdir -p "$W"
"$PY" -c "import os; [os.fsync(os.open(d, os.O_RDONLY)) for d in ('$W', '$LAZYFS_MNT')]"
"$PY" - "$C" <<'PY'
import random, sys
from pathlib import Path
rng, words = random.Random(11), "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river".split()
Path(sys.argv[1]).mkdir(parents=True)
for i in range(300):
    text = " ".join(rng.choice(words) for _ in range(rng.choice((400, 900, 1500))))
    Path(sys.argv[1], f"doc{i:04d}.md").write_text(text + "\n")
PY
ARGS=(--docs "$C" --collection powercut --embed-model hash:32 --upsert-batch 256 --progress off
      --db "$W/chroma" --state-root "$W/state" --embed-log "$W.embedded")
export HF_HUB_OFFLINE=1
embedded() { wc -l < "$W.embedded"; }
"$PY" -m chroma_resume build "${ARGS[@]}" > /dev/null
for f in $(ls "$C" | head -150); do echo " edited" >> "$C/$f"; done
before=$(embedded)
rc=0; CHROMA_RESUME_FAILPOINTS="build.reconcile=kill" "$PY" -m chroma_resume build "${ARGS[@]}" > /dev/null 2>&1 || rc=$?
echo "build 2 killed (rc=$rc) after embedding $(( $(embedded) - before )) chunks"
cleared=$(grep -c "cache is cleared" "$LAZYFS_LOG" || true)
echo "lazyfs::clear-cache" > "$LAZYFS_FIFO"
while [ "$(grep -c 'cache is cleared' "$LAZYFS_LOG" || true)" = "$cleared" ]; do sleep 0.1; done
echo "power cut: cache holds $("$PY" -c "import sqlite3; print(sqlite3.connect('$W/state/embed-cache.sqlite3').execute('select count(*) from vectors').fetchone()[0])") vectors"
before=$(embedded)
"$PY" -m chroma_resume build "${ARGS[@]}" 2>&1 | grep -E "^\[STORE\]|store_set_aside=|chunks_embedded=|chunks_from_cache=" || true
echo "rerun: $(( $(embedded) - before )) model calls"
"$PY" -m chroma_resume verify "${ARGS[@]}" --retry-for 5 | tail -1
