#!/usr/bin/env bash
# Create .venv and install chroma-resume with its test and ray extras (the Ray executor is tested too).
# torch comes first, pinned to the local CPU build: any looser spec pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[test,ray]'
