"""Crash-matrix harness for chroma-resume (DESIGN §9).

For each scenario: build a golden index cleanly and record every failpoint boundary a clean
run passes; then, per chosen boundary, run the build as a subprocess that dies there, damage
the files as the crash could, change the corpus, Chroma or the options as a user could
before resuming, rerun to completion (chained kills allowed) and compare with the golden: a
clean build of the final corpus with the final options from the same starting state.
Modules: scenarios (starting states, options), changes (what happens between crash and
resume), engine (the engine's CLI with its fsyncs observed), walfile (reading and damaging
the WAL), runner (one row), compare (reading results back), matrix (which rows, in
parallel), report (table, JSON, reproduction commands).
"""
