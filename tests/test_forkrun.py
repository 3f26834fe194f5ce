"""The tests' way of running a command (forkrun) must give what a fresh interpreter gives: its own
process, the run's environment, folder and arguments, the exit status, stdout and stderr."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import forkrun

pytestmark = pytest.mark.timeout(120)

_SHOW = """
import json, os, sys
print(json.dumps({"pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv, "x": os.environ.get("FORKRUN_X"),
                  "fresh": "chroma_resume" not in sys.modules}))
print("to stderr ✓", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("env_change", [{}, {"HF_HUB_CACHE": "/nowhere"}], ids=["forked", "subprocess"])
def test_a_run_is_its_own_process_with_its_environment_folder_arguments_and_status(tmp_path, env_change):
    import json

    env = {**os.environ, "FORKRUN_X": "this run's", **env_change}
    done = forkrun.python(["-c", _SHOW, "7", "two words"], tmp_path, env, timeout=60)
    seen = json.loads(done.stdout)
    assert done.returncode == 7 and "to stderr ✓" in done.stderr
    assert seen["pid"] != os.getpid() and seen["cwd"] == str(tmp_path) and seen["x"] == "this run's"
    assert seen["argv"] == ["-c", "7", "two words"] and seen["fresh"]


def test_the_cli_through_forkrun_matches_a_subprocess(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    forked = forkrun.run(["build", "--docs", "missing-folder", "--embed-model", "hash:8"], tmp_path, env, 60)
    plain = subprocess.run([sys.executable, "-m", "chroma_resume", "build", "--docs", "missing-folder",
                            "--embed-model", "hash:8"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=60)
    assert forked.returncode == plain.returncode != 0
    assert forked.stdout == plain.stdout and forked.stderr.splitlines()[-1] == plain.stderr.splitlines()[-1]


def test_an_uncaught_exception_is_exit_1_with_its_traceback_and_a_hang_times_out(tmp_path):
    done = forkrun.python(["-c", "raise ValueError('boom')"], tmp_path, dict(os.environ), timeout=60)
    assert done.returncode == 1 and "Traceback" in done.stderr and "ValueError: boom" in done.stderr
    with pytest.raises(subprocess.TimeoutExpired):
        forkrun.python(["-c", "import time; print('started', flush=True); time.sleep(60)"], tmp_path,
                       dict(os.environ), timeout=3)
