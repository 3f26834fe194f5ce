"""Several indexes in one repository: the `[tool.chroma-resume]` table and its `indexes.<name>` tables.

Each `[tool.chroma-resume.indexes.<name>]` table inherits the top-level table and overrides it, so a
repository states what its indexes share once (model, state root, cache) and what differs per index
(corpus, collection). An index's collection defaults to its name; two indexes writing one collection
of one database would delete each other's documents, so that is refused naming both tables.
Besides the build options (OPTIONS) a table may hold the doit wiring and the verify gate's
inputs (TASK_KEYS): they describe the index's tasks, not its vectors, so they stay out of Config.
A repository without index tables has one index, unnamed, made of the top-level table.
Every error names the file, the table and the key.
"""
from __future__ import annotations

import os
import re
import tomllib

import msgspec

from . import config as cfg
from .errors import UsageError
from .options import OPTIONS, parse_bool

# key -> (type, help): doit wiring and verify's gate, per index
TASK_KEYS: dict[str, tuple[type, str]] = {
    "task-dep": (list, "doit tasks to run first (e.g. the one that generates the corpus)"),
    "file-dep": (list, "files whose change makes doit run the build (it also checks the corpus itself)"),
    "queries": (str, "golden questions (JSONL) that verify asks this index (recall@k, MRR)"),
    "top-k": (int, "hits per golden question (default 5)"),
    "min-recall": (float, "verify fails when recall@k of the golden questions is below this (default 0: report only)"),
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Index(msgspec.Struct, frozen=True):
    name: str | None  # None: the one index of a repository without index tables
    table: str  # where its settings come from, for messages: "pyproject.toml [tool.chroma-resume.indexes.docs]"
    options: dict  # build options (names as in pyproject), top-level table < index table
    task: dict  # TASK_KEYS values, top-level table < index table


def load(folder: str = ".") -> list[Index]:
    """The repository's indexes, in the order the tables appear; [one unnamed index] without tables."""
    location = os.path.join(folder, "pyproject.toml")
    try:
        with open(location, "rb") as fh:
            top = tomllib.load(fh).get("tool", {}).get("chroma-resume", {})
    except FileNotFoundError:
        top = {}
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{location}: {exc}") from None
    tables = dict(top)
    named = tables.pop("indexes", {})
    head = f"{location} [tool.chroma-resume]"
    if not isinstance(named, dict) or not all(isinstance(t, dict) for t in named.values()):
        raise UsageError(f"{head} indexes: expected tables [tool.chroma-resume.indexes.<name>]")
    base_options, base_task = _split(head, tables)
    if not named:
        return [Index(None, head, base_options, base_task)]
    found = []
    for name, table in named.items():
        where = f"{location} [tool.chroma-resume.indexes.{name}]"
        if not _NAME.match(name):
            raise UsageError(f"{where}: an index name is letters, digits, '.', '_' or '-' (it names doit tasks)")
        options, task = _split(where, table)
        merged = {"collection": name, **base_options, **options}
        if merged["collection"] == name:  # the name, taken as collection: say so, the user wrote no collection
            try:
                cfg.check_collection_name(name)
            except UsageError:
                raise UsageError(f"{where}: the index name {name!r} is also its collection name, which Chroma "
                                 f"refuses ({cfg.CHROMA_NAME_RULE}); add collection = \"...\" to the table or "
                                 f"rename the index") from None
        found.append(Index(name, where, merged, {**base_task, **task}))
    _refuse_shared_collections(found)
    return found


def table_names(folder: str = ".") -> list[str]:
    """The names of the index tables, read without checking anything else: a repository whose tables are
    broken still names its doit sub-tasks, so `doit build:docs` can say what is wrong. [] when unreadable."""
    try:
        with open(os.path.join(folder, "pyproject.toml"), "rb") as fh:
            named = tomllib.load(fh).get("tool", {}).get("chroma-resume", {}).get("indexes", {})
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        return []
    return [name for name in named if _NAME.match(name)] if isinstance(named, dict) else []


def find(folder: str, name: str | None) -> Index:
    """The index a command works on: `name`, or the only one."""
    found = load(folder)
    if name is None and found[0].name is None:
        return found[0]
    names = [i.name for i in found if i.name]
    if name is None:
        raise UsageError(f"pyproject.toml defines indexes {', '.join(names)}: give --index NAME")
    for index in found:
        if index.name == name:
            return index
    raise UsageError(f"--index {name!r}: pyproject.toml defines {', '.join(names) or 'no [tool.chroma-resume.indexes.*] table'}")


def resolve(index: Index, given: dict, root: str | None = None) -> cfg.Config:
    """Built-in defaults < the index's tables < given options (None = not given)."""
    stated = {k.replace("_", "-"): v for k, v in given.items() if v is not None}
    configured = index.options
    if {"docs", "units"} & set(stated):  # a corpus named here replaces the configured one, of either kind
        configured = {k: v for k, v in configured.items() if k not in ("docs", "units")}
    merged = {**configured, **stated}
    if root is not None and "root" not in merged:
        merged["root"] = root
    for name, kind, _ in OPTIONS:
        if (kind == "bool" or name == "wal") and name in merged:
            merged[name] = parse_bool(merged[name], name)
    try:
        return cfg.make_config(**merged)
    except UsageError as exc:
        raise UsageError(_blame(index, configured, stated, exc)) from None


def _blame(index: Index, configured: dict, stated: dict, exc: UsageError) -> str:
    """Name where the bad value came from: the table when its values alone fail, else the options given
    (command line, doit option, API keyword), with the table named when it supplied the rest."""
    try:
        cfg.make_config(**configured)
    except UsageError:
        return f"{index.table}: {exc}" if configured else str(exc)
    if not stated:
        return f"{index.table}: {exc}"
    given = " ".join(f"--{name}" for name in stated if name != "root")
    rest = f"; the other values from {index.table}" if configured else ""
    return f"{exc} (given: {given or '--root'}{rest})"


def _split(where: str, table: dict) -> tuple[dict, dict]:
    """(build options, task keys) of one table, each value type-checked alone so the message names its key."""
    kinds = {name: kind for name, kind, _ in OPTIONS}
    unknown = sorted(set(table) - set(kinds) - set(TASK_KEYS))
    if unknown:
        raise UsageError(f"{where}: {cfg.unknown_names_error('key', unknown, [*kinds, *TASK_KEYS])}")
    options, task = {}, {}
    for key, value in table.items():
        if key in TASK_KEYS:
            task[key] = _task_value(where, key, value)
        else:
            options[key] = _option_value(where, key, kinds[key], value)
    return options, task


def _option_value(where: str, key: str, kind, value):
    try:
        if kind == "bool" or key == "wal":  # wal is on|off on the command line, a bool in Config
            return parse_bool(value, key)
        if key in ("include", "exclude") and isinstance(value, str):
            return value
        if isinstance(kind, tuple):
            if value not in kind:
                raise UsageError(f"expected one of {'|'.join(kind)}, got {value!r}")
            return value
        msgspec.convert({key.replace("-", "_"): value}, cfg.Config, strict=False)
    except (UsageError, msgspec.ValidationError) as exc:
        raise UsageError(f"{where} {key}: {str(exc).split(' - at ')[0]}") from None
    return value


def _task_value(where: str, key: str, value):
    kind = TASK_KEYS[key][0]
    if kind is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    else:
        ok = isinstance(value, str) and value != ""
    if not ok:
        want = {list: "a list of strings", float: "a number between 0 and 1", int: "a whole number >= 1",
                str: "a non-empty string"}[kind]
        raise UsageError(f"{where} {key}: expected {want}, got {value!r}")
    return value


def _refuse_shared_collections(found: list[Index], given: dict | None = None) -> None:
    """Two indexes writing one collection of one database would delete each other's documents.
    `given`: index name -> the options its task receives besides its tables (None: the tables alone)."""
    seen: dict[tuple, Index] = {}
    state_of: dict[str, Index] = {}
    for index in found:
        options = (given or {}).get(index.name, {})
        c = resolve(index, options)
        store = cfg.db_identity(c) if c.chroma_host else os.path.realpath(cfg.db_identity(c))  # a symlink: one store
        key = (store, c.collection)
        state = cfg.collection_dir(c)
        if key not in seen and state in state_of:
            raise UsageError(f"{state_of[state].table} and {index.table}: both keep their manifest, WAL and lock in "
                             f"{state} (one --state-root, one collection name, two databases): each build would "
                             f"reset and refill the other's collection. Give each its own collection name (the "
                             f"state root, and so the embedding cache, can stay shared) or its own --state-root")
        state_of[state] = index
        if key in seen:
            stated = sorted(f"--{k.replace('_', '-')} {v}" for k, v in options.items()
                            if v is not None and k.replace("_", "-") in ("collection", "db", "chroma-host",
                                                                          "chroma-port", "chroma-database",
                                                                          "chroma-tenant", "root"))
            by = f" (with {', '.join(stated)} given to every index)" if stated else ""
            raise UsageError(f"{seen[key].table} and {index.table}: both write collection {c.collection!r} of "
                             f"{key[0]}{by}; give each index its own collection")
        seen[key] = index


def group_refusal(own: str | None, own_options: dict, group_options: dict, folder: str = ".") -> UsageError | None:
    """The refusal of the tables' shared-collection check, made on the effective options of every
    sub-task of a doit group: `doit build --collection X` gives X to each index, and their builds
    would then delete each other's documents. Index `own` runs with `own_options` (the group's and
    its own), every other index with the group's. None when each still writes its own collection."""
    found = load(folder)
    if found[0].name is None:
        return None
    try:
        _refuse_shared_collections(found, {i.name: own_options if i.name == own else group_options for i in found})
    except UsageError as exc:
        return exc
    return None


def fingerprints_sharing_cache(c: cfg.Config, folder: str = ".") -> list[str]:
    """The model fingerprints of every index of the repository whose embedding cache is c's file
    (computed from the models' files, no model loaded)."""
    from .cache import cache_path
    from .models import model_fingerprint
    found = [resolve(index, {}, root=folder) for index in load(folder)]  # its paths relative to that project
    return sorted({model_fingerprint(o) for o in found if o.embed_cache != "off" and cache_path(o) == cache_path(c)})


def gate_defaults(index: Index, args) -> None:
    """verify's --queries/--top-k/--min-recall, where not given, from the index's table (CLI and doit alike)."""
    for key in ("queries", "top-k", "min-recall"):
        if getattr(args, key.replace("-", "_"), None) is None and key in index.task:
            setattr(args, key.replace("-", "_"), index.task[key])
