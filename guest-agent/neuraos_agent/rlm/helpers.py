"""Deterministic helpers the REPL offers to the root's programs (stdlib only: they run sandboxed).

Counting, sorting, filtering and pattern matching are done here, in code, never by a model.
Every helper accepts the shapes a context takes — a string, a list of documents, a lazily
loaded `Corpus` — and lists of those, so a program reads the same whatever the source.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

NUMBER = r"-?\d+(?:\.\d+)?"
PATTERNS = {"number": NUMBER, "word": r"[A-Za-z][A-Za-z'-]*", "letter": r"\b[A-D]\b"}


@dataclass
class Document:
    """One file of a corpus, read on first use."""

    name: str
    path: str

    @property
    def text(self) -> str:
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def __str__(self) -> str:
        return f"[{self.name}]\n{self.text}"


class Corpus:
    """A folder of documents, listed at once and read lazily (the vector FS, a log directory)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.docs = [Document(os.path.relpath(os.path.join(d, f), root), os.path.join(d, f))
                     for d, _, files in sorted(os.walk(root)) for f in sorted(files)]

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int | slice) -> Any:
        return self.docs[i]

    def __iter__(self) -> Iterator[Document]:
        return iter(self.docs)

    def __repr__(self) -> str:
        return f"Corpus({len(self.docs)} documents under {self.root})"


def as_text(x: Any) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, Document):
        return str(x)
    if isinstance(x, dict):
        return " || ".join(f"{k}: {v}" for k, v in x.items())
    if isinstance(x, (list, tuple, Corpus)):
        return "\n".join(as_text(i) for i in x)
    return str(x)


def _items(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple, Corpus)) else [x]


def lines(x: Any) -> list[str]:
    return [ln for item in _items(x) for ln in as_text(item).splitlines() if ln.strip()]


def peek(x: Any, start: int = 0, length: int = 1000) -> str:
    """`length` characters of the text from `start` (negative starts count from the end)."""
    text = as_text(x)
    start = max(0, len(text) + start) if start < 0 else start
    return text[start:start + length]


def grep(x: Any, pattern: str, *, max_hits: int = 200, window: int = 200, ignore_case: bool = True) -> list[str]:
    """Lines matching a regex (long lines are cut to `window` characters around the match).

    A pattern that is not a valid regex is matched literally, so a copied phrase always works.
    """
    flags = re.IGNORECASE if ignore_case else 0
    try:
        rx = re.compile(pattern, flags)
    except re.error:
        rx = re.compile(re.escape(pattern), flags)
    hits: list[str] = []
    for ln in lines(x):
        m = rx.search(ln)
        if m:
            if len(ln) > 2 * window:
                a = max(0, m.start() - window)
                ln = ln[a:m.end() + window]
            hits.append(ln)
            if len(hits) >= max_hits:
                break
    return hits


def chunk(x: Any, size: int = 4000, overlap: int = 0) -> list[str]:
    """Pieces of at most about `size` characters, cut at line ends where there are any."""
    text = as_text(x)
    size = max(1, int(size))
    out: list[str] = []
    pos = 0
    while pos < len(text):
        end = min(len(text), pos + size)
        if end < len(text):
            nl = text.rfind("\n", pos + size // 2, end)
            if nl > pos:
                end = nl + 1
        out.append(text[pos:end])
        pos = end if end >= len(text) else max(end - overlap, pos + 1)
    return out


def partition(x: Any, n: int) -> list[str]:
    """`n` pieces of about equal size."""
    text = as_text(x)
    return chunk(text, max(1, -(-len(text) // max(1, int(n)))))


_FIELD = re.compile(r"^\s*([A-Za-z][\w ]{0,30}?)\s*:\s*(.*)$")


def records(x: Any) -> list[dict[str, str]]:
    """Parse `Key: value || Key: value` lines (or JSON lines) into dicts; other lines are skipped."""
    rows: list[dict[str, str]] = []
    for ln in lines(x):
        ln = ln.strip()
        if ln.startswith("{"):
            try:
                obj = json.loads(ln)
                if isinstance(obj, dict):
                    rows.append({str(k): str(v) for k, v in obj.items()})
                continue
            except ValueError:
                pass
        row: dict[str, str] = {}
        for part in ln.split("||"):
            m = _FIELD.match(part)
            if m:
                row[m.group(1).strip()] = m.group(2).strip()
        if row:
            rows.append(row)
    return rows


def _norm(v: Any) -> str:
    return str(v).strip().strip("'\"").lower()


def _rows(x: Any) -> list[dict[str, Any]]:
    items = _items(x)
    return items if items and all(isinstance(i, dict) for i in items) else records(x)


def where(rows: Any, field: str, value: Any) -> list[dict[str, Any]]:
    """The records whose `field` equals `value` (text is parsed into records first)."""
    want = _norm(value)
    return [r for r in _rows(rows) if _norm(_get(r, field)) == want]


def _get(row: dict[str, Any], field: str) -> Any:
    if field in row:
        return row[field]
    low = field.lower()
    for k, v in row.items():
        if k.lower() == low:
            return v
    return None


def column(rows: Any, field: str) -> list[Any]:
    return [_get(r, field) for r in _rows(rows)]


def count(xs: Any, value: Any = None) -> int:
    """How many items (or how many equal `value`, ignoring case and quotes)."""
    items = _items(xs)
    if value is None:
        return len(items)
    want = _norm(value)
    return sum(1 for i in items if _norm(i) == want)


def most_common(xs: Any, n: int = 1) -> Any:
    counts = Counter(_norm(i) for i in _items(xs) if _norm(i))
    top = [k for k, _ in counts.most_common(n)]
    return top[0] if n == 1 and top else top


def compare(xs: Any, a: Any, b: Any) -> str:
    """OOLONG's comparison phrasing: how label `a`'s frequency relates to label `b`'s."""
    ca, cb = count(xs, a), count(xs, b)
    return "more common than" if ca > cb else "less common than" if ca < cb else "same frequency as"


def extract(x: Any, pattern: str = "number") -> list[str]:
    """Every match of a regex (or of a named pattern: number, word, letter) in the text."""
    rx = re.compile(PATTERNS.get(pattern, pattern))
    out: list[str] = []
    for item in _items(x):
        for m in rx.finditer(as_text(item)):
            out.append(m.group(1) if rx.groups else m.group(0))
    return out


QUOTE_GRAMMAR_CHARS = 48_000  # the host refuses grammars past 64,000 characters


def quote_grammar(x: Any, budget: int = QUOTE_GRAMMAR_CHARS) -> str:
    """GBNF whose sentences are the contiguous runs of words of the text (or "yes"/"no").

    A small model asked about a short text it holds invents fluent answers around the fact
    (measured with SmolLM2-135M on a planted "project X is maintained by NAME" line: 3 of 22
    answers named someone else); constrained to quote, it copied the right run in 22 of 22.
    One rule per word position (`p7 ::= "word" (" " p8)?`) keeps the grammar linear in the text.
    Lines are taken from both ends inwards until `budget` characters, matching the middle cut
    the model clients make to prompts past their window.
    """
    lns = [ln.split() for ln in as_text(x).splitlines() if ln.strip()]
    rules, starts, k, size = [], ['"yes"', '"no"'], 0, 40
    lo, hi, from_head = 0, len(lns) - 1, True
    while lo <= hi:
        toks = lns[lo] if from_head else lns[hi]
        line = [f"p{k + i} ::= {json.dumps(t)}" + (f' (" " p{k + i + 1})?' if i + 1 < len(toks) else "")
                for i, t in enumerate(toks)]
        cost = sum(len(r) + len(str(k + i)) + 5 for i, r in enumerate(line))  # + its " | pK" in root
        if size + cost > budget:
            break
        rules += line
        starts += [f"p{k + i}" for i in range(len(toks))]
        k, size = k + len(toks), size + cost
        lo, hi = (lo + 1, hi) if from_head else (lo, hi - 1)
        from_head = not from_head
    return "\n".join(["root ::= " + " | ".join(starts), *rules]) + "\n"


def first(xs: Any) -> Any:
    items = _items(xs)
    return items[0] if items else ""


def vote(xs: Any) -> Any:
    """The most frequent non-empty answer (ties go to the earliest)."""
    items = [i for i in _items(xs) if _norm(i)]
    if not items:
        return ""
    counts = Counter(_norm(i) for i in items)
    best = max(counts.values())
    return next(i for i in items if counts[_norm(i)] == best)


__all__ = ["Corpus", "Document", "as_text", "lines", "peek", "grep", "chunk", "partition", "records", "where",
           "column", "count", "most_common", "compare", "extract", "first", "vote", "quote_grammar"]
