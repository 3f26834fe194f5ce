#!/usr/bin/env bash
# The set-up lives in scripts/setup.py (stdlib only, Windows and POSIX alike); this keeps the old entry point.
exec python3 "$(dirname "$0")/setup.py" "$@"
