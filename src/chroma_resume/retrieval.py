"""The retrieval gate: golden questions asked of the index, recall@k and MRR (`verify --queries FILE.jsonl`).

verify's other checks prove that the collection holds what the manifest implies; none of them says
whether search still finds the right documents. A change of chunking, model or max length can leave
a perfectly consistent index that answers worse. A golden file (one question per line, with the
documents that must come back) measures that: each question is embedded with the index's own model
(with the model's query instruction, where it has one), Chroma returns the top k chunks, and a
question's recall is the share of its expected documents among their documents; its reciprocal rank
is 1 / the rank of the first relevant chunk. Results are per language too (`lang`), since one model
can serve one language well and another badly.

Line format: {"query": "...", "uris": ["guides/http-caching.md"], "doc_ids": [...], "lang": "en"}
(`uris` and/or `doc_ids`; `lang` optional). Only `store` talks to Chroma; this module asks it for
nearest neighbours and maps chunk ids back to documents through the manifest.
"""
from __future__ import annotations

import msgspec

from . import corpus, embedders, models, state, store
from .config import Config
from .errors import UsageError
from .verify import Check

DEFAULT_TOP_K = 5
SHOW = 5  # missed questions named in the check's detail

class Question(msgspec.Struct, forbid_unknown_fields=True):
    query: str
    uris: list[str] = []
    doc_ids: list[str] = []
    lang: str = ""


class Score(msgspec.Struct):
    questions: int
    recall: float  # mean recall@k
    mrr: float  # mean reciprocal rank of the first relevant chunk (0 when none in the top k)


class Retrieval(msgspec.Struct):
    queries: str  # the golden file
    k: int
    min_recall: float
    overall: Score
    by_lang: dict[str, Score]
    missed: list[str]  # questions with no expected document in the top k

    @property
    def ok(self) -> bool:
        return self.overall.recall >= self.min_recall


def load_questions(path: str) -> list[Question]:
    """The golden file, checked line by line before any check runs (exit 2 naming the line)."""
    try:
        with open(path, "rb") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise UsageError(f"--queries {path}: {exc.strerror or exc}") from None
    questions = []
    for number, line in corpus.jsonl_lines(lines):
        try:
            question = msgspec.json.decode(line, type=Question)
        except msgspec.DecodeError as exc:
            raise UsageError(f"--queries {path} line {number}: {exc}") from None
        if not question.query.strip() or not (question.uris or question.doc_ids):
            raise UsageError(f"--queries {path} line {number}: needs a non-empty query and uris or doc_ids")
        questions.append(question)
    if not questions:
        raise UsageError(f"--queries {path}: no questions")
    return questions


def evaluate(c: Config, path: str, questions: list[Question], k: int = DEFAULT_TOP_K,
             min_recall: float = 0.0, index: str | None = None) -> tuple[Retrieval | None, Check]:
    """Ask the index every question; the check fails when mean recall@k is under min_recall. Before any
    build it fails and creates nothing (no Chroma folder is opened that does not exist), and its fix is the
    build command of the options in effect, which runs as printed."""
    manifest = state.load_manifest(state.paths(c)["manifest"])
    # A missing embedded --db is never opened: a client would create the folder. No fix of its own:
    # the manifest or collection check that fails beside it carries the command.
    db = None if manifest is None or store.embedded_store_missing(c) else store.open_store(c)
    if manifest is None or db is None:
        return None, Check("retrieval", False, f"no {'manifest' if manifest is None else 'collection'} to ask "
                                               f"(see the checks above)")
    doc_of_uri = {uri: entry.doc_id for uri, entry in manifest.documents.items()}
    embedder = embedders.load(c)
    prefix = models.query_instruction(c.embed_model)
    vectors = embedder.encode([prefix + q.query for q in questions])
    hits = db.nearest(vectors, min(k, db.count())) if db.count() else [[] for _ in questions]
    per_question = [_score(q, [chunk_id.rsplit(":", 2)[0] for chunk_id, _, _ in found], doc_of_uri)
                    for q, found in zip(questions, hits)]
    by_lang: dict[str, list[tuple[float, float]]] = {}
    for q, scored in zip(questions, per_question):
        by_lang.setdefault(q.lang or "-", []).append(scored)
    result = Retrieval(path, k, min_recall, _mean(per_question), {lang: _mean(s) for lang, s in sorted(by_lang.items())},
                       [q.query for q, (recall, _) in zip(questions, per_question) if recall == 0])
    langs = " ".join(f"{lang}: recall={s.recall:.3f} mrr={s.mrr:.3f} (n={s.questions})"
                     for lang, s in result.by_lang.items())
    detail = (f"recall@{k}={result.overall.recall:.3f} mrr={result.overall.mrr:.3f} over {len(questions)} questions "
              f"(min {min_recall}); {langs}; missed {len(result.missed)} {result.missed[:SHOW]}")
    if not result.ok:  # no command repairs it: what to look at is part of the finding, not a fix to paste
        detail += ("; search got worse: compare the model, --max-length and chunking with the last build that "
                   "passed, then rebuild")
    return result, Check("retrieval", result.ok, detail)


def _score(q: Question, ranked_docs: list[str], doc_of_uri: dict[str, str]) -> tuple[float, float]:
    """(recall, reciprocal rank) of one question; an expected uri the manifest lacks is simply missed."""
    wanted = set(q.doc_ids) | {doc_of_uri.get(uri, f"<unknown uri {uri}>") for uri in q.uris}
    found = wanted & set(ranked_docs)
    first = next((rank for rank, doc in enumerate(ranked_docs, 1) if doc in wanted), None)
    return len(found) / len(wanted), (1.0 / first if first else 0.0)


def _mean(scores: list[tuple[float, float]]) -> Score:
    n = len(scores)
    return Score(n, sum(r for r, _ in scores) / n, sum(m for _, m in scores) / n)
