"""Command lines for the fixes we print: the options in effect, so a pasted fix acts on the same index.

A fix that names only the verb (`chroma-resume build`) would, from a shell, repair the default
corpus, database and collection, not the one a check failed on. So every printed fix is rendered
here from the Config that check ran with: each option that differs from the built-in default,
quoted for the shell it will be pasted into (CMD on Windows, a POSIX shell elsewhere), with --root as an absolute path (a fix pasted in another folder acts on the same index), --index
when the index is one of several, and every option the fix itself sets, even at its default.
"""
from __future__ import annotations

import os
import shlex

import msgspec

from . import osfs
from .config import Config

PROGRAM = "chroma-resume"
_ON_OFF = {"wal"}  # booleans the command line spells on|off (OPTIONS' kind), not true|false


def command_line(c: Config, verb: str, *extra: str, index: str | None = None, **changes) -> str:
    """`chroma-resume VERB --option value …` for config `c` with `changes` applied, then `extra` words."""
    c = msgspec.structs.replace(c, **changes) if changes else c
    default = Config()
    words = [PROGRAM, verb, f"--root={os.path.abspath(c.root)}"]  # so it runs the same from any folder
    if index:
        words.append(f"--index={index}")
    for field in msgspec.structs.fields(Config):
        name, value = field.name, getattr(c, field.name)
        if name == "root" or value is None or (value == getattr(default, name) and name not in changes):
            continue  # a value the fix sets is spelled out even when it is the default: pyproject may differ
        words.append(f"--{name.replace('_', '-')}={_spell(name, value)}")  # `=`: a value may start with '-'
    return shell_join([*words, *extra])


def move_command(source: str, target: str) -> str:
    """Rename a file, in the shell's own words: `move` in CMD, `mv` elsewhere."""
    return shell_join(["move" if osfs.IS_WINDOWS else "mv", source, target])


# Characters CMD acts on outside double quotes (a path like `C:\R&D\docs` would end the command at `&`).
CMD_METACHARACTERS = frozenset('&|<>^()')


def shell_join(words: list[str], *, windows: bool | None = None) -> str:
    """Words quoted so the shell a person pastes them into gives the program these words back: CMD
    on Windows (double quotes, by the rules programs there split arguments by; single quotes would
    reach the program literally), POSIX shells elsewhere (shlex.join)."""
    if not (osfs.IS_WINDOWS if windows is None else windows):
        return shlex.join(words)
    return " ".join(_cmd_word(word) for word in words)


def _cmd_word(word: str) -> str:
    """One word for CMD: bare when nothing in it is special, else in double quotes, which CMD passes
    whole (its metacharacters included) and the MSVCRT rules split back: a quote inside is \\", and the
    backslashes before a quote, or before the closing one, are doubled. `%NAME%` still expands in CMD:
    no quoting stops that, and paths rarely hold it."""
    if word and not any(ch in ' \t"' or ch in CMD_METACHARACTERS for ch in word):
        return word
    quoted, backslashes = [], 0
    for ch in word:
        if ch == "\\":
            backslashes += 1
            continue
        quoted.append("\\" * (2 * backslashes + 1) + '"' if ch == '"' else "\\" * backslashes + ch)
        backslashes = 0
    return '"' + "".join(quoted) + "\\" * (2 * backslashes) + '"'


def _spell(name: str, value) -> str:
    if isinstance(value, bool):
        return ("on" if value else "off") if name in _ON_OFF else str(value).lower()
    if isinstance(value, tuple):
        return shlex.join(value)  # the command line splits globs the way a shell does (config.make_config)
    return str(value)
