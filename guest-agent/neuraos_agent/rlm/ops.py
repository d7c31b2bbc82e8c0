"""A small vocabulary of REPL operations for root models too weak to write Python.

A program is one operation per line, a pipeline over `_` (which starts as `context`); each
operation compiles to one line of Python that runs in the same sandboxed REPL as free-form
code. `grammar()` builds a GBNF grammar for one question so that a constrained decoder can
only emit valid programs, and can only quote words that occur in the question (a small model
copies reliably when it cannot do anything else).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Sequence

from neuraos_agent.rlm.errors import OpsSyntaxError

MAX_OPS = 8
MAX_SPAN_WORDS = 10
EXTRACTS = ("number", "word", "letter")
RANK_CHUNK = 1200  # characters per piece when `rank` cuts a text itself (two fit a 1k-token window)


@dataclass(frozen=True)
class Op:
    name: str
    args: tuple[str | int, ...] = ()


@dataclass(frozen=True)
class Vocabulary:
    """Which operations a program may use: tools and fields exist only where the REPL has them."""

    fields: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()          # classify, rank (served by the parent)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", tuple(f for f in self.fields if re.fullmatch(r"\w+", f)))

    def describe(self) -> str:
        lines = [
            'grep "words"          keep the lines that contain the words',
            "peek N                the first N characters",
            "chunk N               cut into pieces of N characters",
        ]
        if self.fields:
            lines += ['where FIELD "words"   keep the records whose FIELD is the words',
                      "column FIELD          the FIELD of each record"]
        if "classify" in self.tools:
            lines.append("classify FIELD        the label of each record's FIELD" if self.fields
                         else "classify              the label of each line")
        if "rank" in self.tools:
            lines.append('rank "words" N        the N pieces closest in meaning to the words')
        lines += [
            "answer                ask the model the question about the current text (one call)",
            "ask                   ask the model the question about each piece (one call each)",
            "extract number|word|letter   every number, word or option letter",
            'first / count / count "label" / top / vote / sort',
            'compare "A" "B"       is label A more common, less common or the same as B',
            "show                  print the result and look again next turn",
            "final                 the result is the answer",
        ]
        return "\n".join(lines)


def _spans(question: str) -> list[str]:
    stem = re.split(r"\s\(A\)\s", question)[0]  # a multiple-choice question: quote from its stem
    words = [w.strip(".,;:!?()[]{}\"'`") for w in stem.split()]
    words = [w for w in words if w]
    spans: list[str] = []
    for i in range(len(words)):
        for j in range(i + 1, min(len(words), i + MAX_SPAN_WORDS) + 1):
            s = " ".join(words[i:j])
            if s not in spans:
                spans.append(s)
    whole = " ".join(words)
    if whole and whole not in spans:
        spans.append(whole)  # the whole stem, e.g. as a query for `rank`
    for q in re.findall(r"'([^']{1,60})'|\"([^\"]{1,60})\"", question):
        s = next(x for x in q if x)
        if s not in spans:
            spans.append(s)
    return spans


def _lit(s: str) -> str:
    return json.dumps(s)  # a GBNF string literal has JSON's escapes


def grammar(question: str, vocab: Vocabulary) -> str:
    """GBNF for well-typed programs about `question`.

    The pipeline's value is text (t), records (r), a list (l) or a single answer (s); each rule
    lists the operations that make sense on that type, so a program cannot end before it has
    computed an answer (`final` only follows a scalar) or apply `top` to raw text. Extracted
    values (x) and sorted ones (y) cannot be extracted or sorted again: measured with SmolLM2
    over the host's backend (no repeat penalty), a prompt it found unfamiliar made it write
    `extract number` until max_tokens, which the grammar now rules out. A multiple-choice
    question (options "(A) ...") only admits programs whose answer can be a letter, and
    `peek`/`chunk` take at least 100 characters (measured: "chunk 2; count; final" on one), and
    pieces (p) cannot be counted or picked, only read, searched or ranked.
    """
    strs = _spans(question) or ["?"]
    choice = bool(re.search(r"\s\(A\)\s", question))
    fields, classify, rank = bool(vocab.fields), "classify" in vocab.tools, "rank" in vocab.tools
    # no `answer` on text: a long text must be cut down (grep, rank, chunk) before a model reads it
    # nor `extract` on the whole text: every number or word of a context past the window is no
    # answer, and a small root that is unsure opens with it (measured: "extract letter; first")
    t = ['"grep " str "\\n" l', '"peek " size "\\n" t', '"chunk " size "\\n" p']
    r = ['"where " field " " str "\\n" r', '"column " field "\\n" l', '"first\\n" s']
    ends = ['"first\\n" s', '"top\\n" s', '"vote\\n" s', '"answer\\n" s']
    if not choice:
        r.append('"count\\n" s')
        ends += ['"count\\n" s', '"count " str "\\n" s', '"compare " str " " str "\\n" s']
    lst = ['"extract " ext "\\n" x', '"grep " str "\\n" l', '"ask\\n" l', '"sort\\n" y'] + ends
    if fields:
        t.append('"where " field " " str "\\n" r')
    if classify:
        t.append('"classify " field "\\n" l' if fields else '"classify\\n" l')
        r.append('"classify " field "\\n" l')
    if rank:
        t.append('"rank " str " " num "\\n" l')
        lst.append('"rank " str " " num "\\n" l')
    rules = [
        "root ::= t",
        "t ::= " + " | ".join(t + ['"show"']),
        "l ::= " + " | ".join(lst + ['"show"']),
        "s ::= \"final\" | \"show\"",
        # pieces (p) are read, searched or ranked; counting or picking them says nothing about the
        # text (measured: "chunk 12345; count; final" for a needle)
        "p ::= " + " | ".join(['"grep " str "\\n" l', '"ask\\n" l', '"extract " ext "\\n" x', '"answer\\n" s']
                              + (['"rank " str " " num "\\n" l'] if rank else []) + ['"show"']),
        "x ::= " + " | ".join(['"sort\\n" y'] + ends + ['"show"']),
        "y ::= " + " | ".join(ends + ['"show"']),
        "str ::= \"\\\"\" (" + " | ".join(_lit(s) for s in strs) + ") \"\\\"\"",
        "num ::= [1-9] [0-9]{0,4}",
        "size ::= [1-9] [0-9]{2,4}",
        "ext ::= " + " | ".join(_lit(e) for e in (("letter",) if choice else EXTRACTS)),
    ]
    if fields:
        rules.append("r ::= " + " | ".join(r + ['"show"']))
        rules.append("field ::= " + " | ".join(_lit(f) for f in vocab.fields))
    return "\n".join(rules) + "\n"


_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')


def parse(text: str, vocab: Vocabulary) -> list[Op]:
    """Parse a program; raises `OpsSyntaxError` naming the first bad line."""
    ops: list[Op] = []
    for n, raw in enumerate(text.strip().splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        toks = [json.loads(f'"{m.group(1)}"') if m.group(1) is not None else m.group(2)
                for m in _TOKEN.finditer(line)]
        name, args = toks[0].lower(), toks[1:]
        try:
            ops.append(_check(name, args, vocab))
        except (ValueError, IndexError) as exc:
            raise OpsSyntaxError(f"line {n} {line!r}: {exc}") from exc
        if name in ("final", "show"):
            break
    if not ops:
        raise OpsSyntaxError("empty program")
    if len(ops) > MAX_OPS + 2:
        raise OpsSyntaxError(f"more than {MAX_OPS} operations")
    return ops


def _check(name: str, args: list[str], vocab: Vocabulary) -> Op:
    def need(k: int) -> None:
        if len(args) != k:
            raise ValueError(f"{name} takes {k} argument(s)")

    if name in ("grep",):
        need(1)
        return Op(name, (args[0],))
    if name in ("peek", "chunk"):
        need(1)
        return Op(name, (int(args[0]),))
    if name == "rank":
        if "rank" not in vocab.tools:
            raise ValueError("rank is not offered here")
        need(2)
        return Op(name, (args[0], int(args[1])))
    if name in ("where",):
        need(2)
        return Op(name, (args[0], args[1]))
    if name == "column":
        need(1)
        return Op(name, (args[0],))
    if name == "classify":
        if "classify" not in vocab.tools:
            raise ValueError("classify is not offered here")
        return Op(name, tuple(args[:1]))
    if name == "extract":
        need(1)
        if args[0] not in EXTRACTS:
            raise ValueError(f"extract takes one of {', '.join(EXTRACTS)}")
        return Op(name, (args[0],))
    if name == "count":
        return Op(name, tuple(args[:1]))
    if name == "compare":
        need(2)
        return Op(name, (args[0], args[1]))
    if name in ("answer", "ask", "first", "top", "vote", "sort", "show", "final"):
        need(0)
        return Op(name)
    raise ValueError(f"unknown operation {name!r}")


# Without a grammar for the question's answers, the reader may only quote the text it was given.
_ANSWER = ('llm_query(f"{{{src}}}\\n\\nQuestion: {{question}}\\nAnswer:", max_tokens=answer_tokens, '
           'grammar=answer_grammar or quote_grammar({src}))')


def compile_ops(ops: Sequence[Op]) -> str:
    """Python for a parsed program; runs in the REPL next to free-form code."""
    py = ["_ = context"]
    for op in ops:
        a = op.args
        line = {
            "grep": lambda: f"_ = grep(_, {a[0]!r})",
            "peek": lambda: f"_ = peek(_, 0, {a[0]})",
            "chunk": lambda: f"_ = chunk(_, {a[0]})",
            "where": lambda: f"_ = where(_, {a[0]!r}, {a[1]!r})",
            "column": lambda: f"_ = column(_, {a[0]!r})",
            "classify": lambda: f"_ = classify(column(_, {a[0]!r}))" if a else "_ = classify(lines(_))",
            "rank": lambda: f"_ = rank(_ if isinstance(_, list) else chunk(_, {RANK_CHUNK}), {a[0]!r}, {a[1]})",
            "answer": lambda: "_ = " + _ANSWER.format(src="as_text(_)"),
            "ask": lambda: "_ = [" + _ANSWER.format(src="as_text(p)") + " for p in (_ if isinstance(_, list) else [_])]",
            "extract": lambda: f"_ = extract(_, {a[0]!r})",
            "first": lambda: "_ = first(_)",
            "count": lambda: f"_ = count(_, {a[0]!r})" if a else "_ = count(_)",
            "top": lambda: "_ = most_common(_)",
            "vote": lambda: "_ = vote(_)",
            "sort": lambda: "_ = sorted(_, key=str)",
            "compare": lambda: f"_ = compare(_, {a[0]!r}, {a[1]!r})",
            "show": lambda: "print(repr(_)[:2000])",
            "final": lambda: "FINAL(_)",
        }[op.name]()
        py.append(line)
    return "\n".join(py) + "\n"


_QUOTED = {"grep": (0,), "where": (1,), "rank": (0,), "count": (0,), "compare": (0, 1)}


def to_text(ops: Sequence[Op]) -> str:
    """The program as the root writes it (the inverse of `parse`)."""
    return "\n".join(" ".join([op.name, *(json.dumps(x) if i in _QUOTED.get(op.name, ()) else str(x)
                                          for i, x in enumerate(op.args))]) for op in ops)
