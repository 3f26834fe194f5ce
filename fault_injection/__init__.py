"""Crash-matrix harness for chroma-resume (DESIGN §9).

For each scenario: build a golden index cleanly and record every failpoint boundary it
passes; then, per chosen boundary, run the build as a subprocess that dies there,
damage the files as the crash could, rerun to completion (chained kills allowed) and
compare with the golden. Modules: scenarios (starting states), walfile (reading and
damaging the WAL), runner (one row), compare (reading results back), matrix (which
rows, in parallel), report (table, JSON, reproduction commands).
"""
