"""What the root model is told each turn: the question, the context's description, its own
earlier turns with their (truncated) outputs — never the context itself.

Two styles: op programs with few-shot examples for small models (the examples are what a
135M model imitates, so they cover the common shapes of question), and free-form Python in
the manner of the RLM paper for models that can write it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from neuraos_agent.rlm.context import ContextInfo
from neuraos_agent.rlm.ops import Vocabulary


@dataclass(frozen=True)
class Step:
    """One earlier turn as the root sees it again."""

    code: str
    output: str


@dataclass(frozen=True)
class Example:
    question: str
    program: str
    needs: tuple[str, ...] = ()      # fields/tools the program uses; shown only where they exist


EXAMPLES = (
    Example("What is the access code for the north gate mentioned in the text?",
            'grep "access code for the north gate"\nextract number\nfirst\nfinal'),
    Example("What is the secret number for the red door in the document?",
            'grep "secret number for the red door"\nextract number\nfirst\nfinal'),
    Example("Who looks after the harbour lighthouse mentioned in the notes?",
            'grep "the harbour lighthouse"\nanswer\nfinal'),
    Example("Which city does the text say the old archive moved to?",
            'grep "the old archive"\nanswer\nfinal'),
    Example("How many entries from user 512 are labelled 'animal'?",
            'where {ID} "512"\nclassify {TEXT}\ncount "animal"\nfinal', ("fields", "classify")),
    Example("How many messages from User 3301 have the label 'complaint'? Each message has one label.",
            'where {ID} "3301"\nclassify {TEXT}\ncount "complaint"\nfinal', ("fields", "classify")),
    Example("How many entries does user 77 have?", 'where {ID} "77"\ncount\nfinal', ("fields",)),
    Example("How many messages does User 4120 have in the log?", 'where {ID} "4120"\ncount\nfinal', ("fields",)),
    Example("How many entries have the label 'plant'? Each entry has one of the labels 'animal', 'plant', 'rock'.",
            'classify {TEXT}\ncount "plant"\nfinal', ("fields", "classify")),
    Example("Which label is the most common among all the entries: 'animal', 'plant' or 'rock'?",
            "classify {TEXT}\ntop\nfinal", ("fields", "classify")),
    Example("In the data, is label 'plant' more common, less common, or the same frequency as label 'rock'?",
            'classify {TEXT}\ncompare "plant" "rock"\nfinal', ("fields", "classify")),
    Example("Why did the captain leave the ship?\n\n (A) fear\n (B) orders\n (C) a storm\n (D) money",
            'rank "Why did the captain leave the ship" 2\nanswer\nfinal', ("rank",)),
    Example("What does Mara think of the new mayor?\n\n (A) she trusts him\n (B) she fears him\n (C) she "
            "ignores him\n (D) she admires him", 'rank "What does Mara think of the new mayor" 2\nanswer\nfinal',
            ("rank",)),
    Example("What did the report say about the harbour budget?",
            'rank "report say about the harbour budget" 2\nanswer\nfinal', ("rank",)),
)

_WORD = re.compile(r"[a-z]+|\([a-d]\)|'")


def _similarity(a: str, b: str) -> float:
    wa, wb = set(_WORD.findall(a.lower())), set(_WORD.findall(b.lower()))
    return len(wa & wb) / math.sqrt(len(wa) * len(wb) or 1)


def select_examples(question: str, vocab: Vocabulary, k: int = 1) -> list[Example]:
    """The k examples this vocabulary can express that are most like the question, the most
    similar last, with this context's field names filled in. Measured with SmolLM2-135M: one
    example makes it copy the right program shape far more often than two or three."""
    def ok(e: Example) -> bool:
        return all((n == "fields" and vocab.fields) or n in vocab.tools for n in e.needs)

    f = vocab.fields
    ident = next((x for x in f if any(t in x.lower() for t in ("user", "id", "name"))), f[0]) if f else "User"
    text = f[-1] if f else "Text"
    usable = [Example(e.question, e.program.format(ID=ident, TEXT=text), e.needs) for e in EXAMPLES if ok(e)]
    ranked = sorted(usable, key=lambda e: _similarity(question, e.question))
    return ranked[-k:]


def _history(steps: list[Step]) -> str:
    if not steps:
        return ""
    parts = ["\nWhat you ran so far:"]
    for i, s in enumerate(steps, 1):
        parts.append(f"[program {i}]\n{s.code.strip()}\n[output {i}]\n{s.output.strip() or '(nothing printed)'}")
    return "\n".join(parts) + "\n"


def ops_prompt(question: str, info: ContextInfo, vocab: Vocabulary, steps: list[Step], window: int | None) -> str:
    ex = "\n\n".join(f"Q: {e.question}\n{e.program}" for e in select_examples(question, vocab))
    return (
        "You cannot read the context. Write a program that reads it: one operation per line, each applied "
        "to the result of the line before; end with final.\n\n"
        f"{ex}\n\n{info.sentence(window)}\n{_history(steps)}\nQ: {question}\n"
    )


def python_prompt(question: str, info: ContextInfo, tools: tuple[str, ...], steps: list[Step],
                  window: int | None, depth: int) -> str:
    extra = "".join(f"\n- `{t}(...)`: a tool served by the host" for t in tools)
    return (
        "You answer a question about a context you cannot see directly. You have a Python REPL "
        "(persistent between turns) where the context is the variable `context`. "
        f"{info.sentence(window)}\n"
        "In the REPL you have:\n"
        "- `peek(x, start, length)`, `grep(x, regex)`, `lines(x)`, `chunk(x, size)`, `partition(x, n)`, "
        "`records(x)`, `where(rows, field, value)`, `column(rows, field)`, `count(xs, value)`, "
        "`most_common(xs)`, `extract(x, regex)`\n"
        "- `llm_query(prompt)`: one call to a language model that reads about "
        f"{(window or 8192) * 3:,} characters; use it on pieces, never on the whole context\n"
        "- `rlm_query(prompt, piece)`: a recursive call like this one on a piece too large for llm_query"
        f"{' (depth ' + str(depth) + ')' if depth else ''}\n"
        f"- `FINAL(answer)` or `FINAL_VAR(name)` to finish.{extra}\n"
        "Do counting, sorting and arithmetic in code. Printed output is cut to a few thousand characters. "
        "Reply with one ```repl code block per turn.\n"
        f"{_history(steps)}\nQuestion: {question}\n"
    )
