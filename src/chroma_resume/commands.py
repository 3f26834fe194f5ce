"""Command lines for the fixes we print: the options in effect, so a pasted fix acts on the same index.

A fix that names only the verb (`chroma-resume build`) would, from a shell, repair the default
corpus, database and collection, not the one a check failed on. So every printed fix is rendered
here from the Config that check ran with: each option that differs from the built-in default,
shell-quoted, and --root as an absolute path unless it is the current folder.
"""
from __future__ import annotations

import os
import shlex

import msgspec

from .config import Config

PROGRAM = "chroma-resume"
_ON_OFF = {"wal"}  # booleans the command line spells on|off (OPTIONS' kind), not true|false


def command_line(c: Config, verb: str, *extra: str, **changes) -> str:
    """`chroma-resume VERB --option value …` for config `c` with `changes` applied, then `extra` words."""
    c = msgspec.structs.replace(c, **changes) if changes else c
    default = Config()
    words = [PROGRAM, verb]
    root = os.path.abspath(c.root)
    if root != os.getcwd():
        words += ["--root", root]
    for field in msgspec.structs.fields(Config):
        name, value = field.name, getattr(c, field.name)
        if name == "root" or value == getattr(default, name) or value is None:
            continue
        words += [f"--{name.replace('_', '-')}", _spell(name, value)]
    return shlex.join([*words, *extra])


def _spell(name: str, value) -> str:
    if isinstance(value, bool):
        return ("on" if value else "off") if name in _ON_OFF else str(value).lower()
    if isinstance(value, tuple):
        return " ".join(value)
    return str(value)
