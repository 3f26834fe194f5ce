"""Documents from a folder or a units JSONL, streamed one at a time.

Every document is read once to plan (its hash) and once more only if it must be
embedded; the second read re-hashes, so the text that was hashed is the text
that was embedded even if the file changed in between.
"""
from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import math
import os
import stat
from collections.abc import Callable, Iterable, Iterator

import msgspec

from . import config as cfg
from . import state
from .config import Config
from .errors import UsageError


class Document(msgspec.Struct, kw_only=True):
    uri: str
    doc_id: str
    content_sha256: str
    source_type: str
    updated_at: str = ""
    text: str = ""
    metadata: dict = msgspec.field(default_factory=dict)


Warn = Callable[..., None]


class Listing(msgspec.Struct):
    """What a scan listed but could not read. Skipped is not deleted (DESIGN §4): only a
    document absent from a listing that succeeded is removed."""
    files: set[str] = msgspec.field(default_factory=set)
    dirs: set[str] = msgspec.field(default_factory=set)

    def unread(self, uri: str) -> bool:
        return uri in self.files or "." in self.dirs or any(uri.startswith(d + "/") for d in self.dirs)


def normalize_newlines(text: str) -> str:
    """`\r\n` and `\r` become `\n` before hashing and chunking: a document's identity must not depend
    on the checkout (git's autocrlf on Windows). Text with LF endings is returned unchanged, so its
    hashes and chunk ids stay what they were."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def doc_id_for(uri: str) -> str:
    return hashlib.sha1(uri.encode("utf-8")).hexdigest()[:16]


def source_path(c: Config) -> str:
    """The corpus location; missing is a usage error that names the path."""
    given = c.docs or c.units
    if not given:
        raise UsageError("no corpus: give --docs DIR or --units FILE.jsonl")
    location = cfg.path(c, given)
    if c.docs and not os.path.isdir(location):
        raise UsageError(f"corpus folder not found: {location}")
    if c.units and not os.path.isfile(location):
        raise UsageError(f"units file not found: {location}")
    return location


def scan(c: Config, warn: Warn, only: set[str] | None = None, listing: Listing | None = None) -> Iterator[Document]:
    """Yield the corpus documents in a stable order (only those in `only`, if given);
    what was listed but could not be read goes into `listing`."""
    if c.units:
        yield from _units(c, source_path(c), only)
    else:
        yield from _folder(c, source_path(c), warn, only, listing if listing is not None else Listing())


# ---- folder corpus -------------------------------------------------------------------

def _folder(c: Config, root: str, warn: Warn, only: set[str] | None, listing: Listing) -> Iterator[Document]:
    def skip(key: str, uri: str, reason: str) -> None:
        (listing.dirs if key == "unreadable_dir" else listing.files).add(uri)
        _skip(c, warn, key, uri, reason)

    for full, uri in _walk(root, c.include, c.exclude, skip):
        if only is not None and uri not in only:
            continue
        doc = _read_file(c, full, uri, skip)
        if doc is not None:
            yield doc


def _walk(root: str, include: Iterable[str], exclude: Iterable[str], skip: Warn) -> Iterator[tuple[str, str]]:
    """Depth-first, sorted, symlink-aware: links leaving the root and loops are skipped."""
    real_root = os.path.realpath(root)
    seen_dirs = {real_root}
    stack = [(root, "")]
    while stack:
        folder, rel = stack.pop()
        try:
            names = sorted(os.listdir(folder), reverse=True)
        except OSError as exc:
            skip("unreadable_dir", rel or ".", exc.strerror or str(exc))
            continue
        for name in names:
            full = os.path.join(folder, name)
            uri = f"{rel}/{name}" if rel else name
            if any(_matches(uri, p) or _matches(name, p) for p in exclude):
                continue
            if not _valid_utf8(name) and (os.path.isdir(full) or any(_matches(name, p) for p in include)):
                # no uri, doc_id or Chroma id can carry it: kept as unreadable (skipped is not deleted)
                skip("not_utf8_name", _escaped(uri), "file name is not valid UTF-8 (rename it to index it)")
                continue
            if os.path.islink(full):
                target = os.path.realpath(full)
                if not os.path.exists(target):
                    skip("broken_symlink", uri, "broken symlink")
                    continue
                if os.path.commonpath([real_root, target]) != real_root:
                    skip("symlink_outside_root", uri, f"points outside the corpus root to {target}")
                    continue
            if os.path.isdir(full):
                real = os.path.realpath(full)
                # a Windows junction is no symlink to os.path.islink (3.11), but realpath resolves it
                if os.path.commonpath([real_root, real]) != real_root:
                    skip("symlink_outside_root", uri, f"points outside the corpus root to {real}")
                    continue
                if real in seen_dirs:
                    skip("symlink_loop", uri, "symlink loop")
                    continue
                seen_dirs.add(real)
                stack.append((full, uri))
            elif any(_matches(name, p) for p in include):
                yield full, uri


def _matches(name: str, pattern: str) -> bool:
    """Case-sensitive on every OS (fnmatch.fnmatch folds case on Windows: `*.md` would take README.MD
    there), so one corpus lists the same documents on every system."""
    return fnmatch.fnmatchcase(name, pattern)


def _valid_utf8(name: str) -> bool:
    """os.listdir decodes undecodable bytes as lone surrogates, which no UTF-8 text can hold."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _escaped(uri: str) -> str:
    """The name as bytes a person can read: undecodable bytes shown as \\xNN."""
    return uri.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _read_file(c: Config, full: str, uri: str, skip: Warn) -> Document | None:
    try:
        info = os.stat(full)
        if not stat.S_ISREG(info.st_mode):
            return skip("not_regular_file", uri, "not a regular file")
        with open(full, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return skip("unreadable", uri, exc.strerror or str(exc))
    if b"\x00" in data:
        return skip("binary_file", uri, "contains NUL bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return skip("not_utf8", uri, f"invalid UTF-8 at byte {exc.start}")
    text = normalize_newlines(text.removeprefix("\ufeff"))
    updated = dt.datetime.fromtimestamp(info.st_mtime, dt.timezone.utc).isoformat(timespec="seconds")
    ext = os.path.splitext(uri)[1].lstrip(".").lower() or "text"
    return Document(uri=uri, doc_id=doc_id_for(uri), content_sha256=sha256_text(text),
                    source_type=ext, updated_at=updated, text=text)


def _skip(c: Config, warn: Warn, key: str, uri: str, reason: str) -> None:
    if c.on_read_error == "fail":
        raise UsageError(f"{uri}: {reason} (--on-read-error fail)")
    warn(key, path=uri, reason=reason)
    return None


# ---- units JSONL ---------------------------------------------------------------------

class _Unit(msgspec.Struct, forbid_unknown_fields=True):  # a misspelt key must not be dropped silently
    source_uri: str
    text: str
    doc_id: str | None = None
    content_sha256: str | None = None
    source_type: str | None = None
    updated_at: str | None = None
    metadata: dict | None = None


_unit_decoder = msgspec.json.Decoder(_Unit)


INT64 = (-2**63, 2**63 - 1)  # Chroma stores ints as int64; a larger one would come back as a float


def _metadata_problems(metadata: dict | None) -> list[str]:
    """Why Chroma could not store a unit's metadata exactly (DESIGN §8: refused naming the line,
    never dropped or changed silently): values must be str, bool, int64 or finite float; keys
    non-empty, not Chroma's reserved `chroma:*`, not starting with `$` or `#` (Chroma 1.x refuses
    those at upsert, "Invalid metadata at index N", naming neither line nor key: they are its
    operators and reserved fields), not a key chroma-resume writes on every chunk."""
    problems = []
    for key, value in (metadata or {}).items():
        if not key or key.startswith(("chroma:", "$", "#")) or key in state.CHUNK_KEYS:
            why = "an empty key" if not key else "reserved by Chroma" if key.startswith("chroma:") else \
                "refused by Chroma (a key starting with $ or # names its operators and reserved fields)" \
                if key.startswith(("$", "#")) else "written by chroma-resume on every chunk"
            problems.append(f"metadata key {key!r}: {why}")
        elif isinstance(value, bool) or isinstance(value, str):
            continue
        elif isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
            problems.append(f"metadata {key!r}: {value} is outside int64 (give it as a string)")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"metadata {key!r}: {value} is not a finite number")
        elif not isinstance(value, (int, float)):
            kind = "null" if value is None else type(value).__name__
            problems.append(f"metadata {key!r}: a {kind} value; Chroma stores str, int, float or bool")
    return problems


UTF8_BOM = b"\xef\xbb\xbf"


def jsonl_lines(lines: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """The non-blank lines of a JSONL file with their 1-based numbers, a leading UTF-8 BOM dropped: Windows
    PowerShell 5's `Out-File -Encoding utf8` and Notepad's "UTF-8 with BOM" start a file with one, which
    JSON tools read past and msgspec refuses (for the units file and `verify --queries`' golden file)."""
    for lineno, raw in enumerate(lines, 1):
        raw = raw.removeprefix(UTF8_BOM) if lineno == 1 else raw
        if raw.strip():
            yield lineno, raw


def _units(c: Config, location: str, only: set[str] | None) -> Iterator[Document]:
    """Validate the whole file before yielding, so bad input stops the run before any write."""
    errors: list[str] = []
    first_line: dict[str, int] = {}
    first_id: dict[str, int] = {}
    with open(location, "rb") as fh:
        for lineno, raw in jsonl_lines(fh):
            try:
                unit = _unit_decoder.decode(raw)
            except msgspec.DecodeError as exc:
                errors.append(f"{location}:{lineno}: {exc}")
                continue
            errors += [f"{location}:{lineno}: {problem}" for problem in _metadata_problems(unit.metadata)]
            if unit.source_uri in first_line:
                errors.append(f"{location}:{lineno}: duplicate source_uri {unit.source_uri!r} "
                              f"(first on line {first_line[unit.source_uri]})")
                continue
            first_line[unit.source_uri] = lineno
            doc_id = unit.doc_id or doc_id_for(unit.source_uri)
            if doc_id in first_id:  # two documents would write the same chunk ids
                errors.append(f"{location}:{lineno}: duplicate doc_id {doc_id!r} (first on line {first_id[doc_id]})")
                continue
            first_id[doc_id] = lineno
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  … and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise UsageError(f"units file has {len(errors)} bad line(s):\n  {shown}{more}")
    with open(location, "rb") as fh:
        for _, raw in jsonl_lines(fh):
            unit = _unit_decoder.decode(raw)
            if only is not None and unit.source_uri not in only:
                continue
            text = normalize_newlines(unit.text)
            yield Document(
                uri=unit.source_uri,
                doc_id=unit.doc_id or doc_id_for(unit.source_uri),
                content_sha256=sha256_text(text),
                source_type=unit.source_type or "unit",
                updated_at=unit.updated_at or "",
                text=text,
                metadata=unit.metadata or {},  # checked by _metadata_problems: stored exactly as given
            )
