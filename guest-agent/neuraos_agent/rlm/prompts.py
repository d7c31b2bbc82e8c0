"""What the root model is told each turn: the question, the context's description, its own
earlier turns with their (truncated) outputs — never the context itself.

Two styles: op programs with few-shot examples for small models (the examples are what a
135M model imitates, so they cover the common shapes of question), and free-form Python in
the manner of the RLM paper for models that can write it.
"""

from __future__ import annotations

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
    Example("How many entries from user 512 are labelled 'animal'?",
            'where {ID} "512"\nclassify {TEXT}\ncount "animal"\nfinal', ("fields", "classify")),
    Example("How many entries does user 77 have?", 'where {ID} "77"\ncount\nfinal', ("fields",)),
    Example("Which label is the most common among all entries: 'animal', 'plant' or 'rock'?",
            "classify {TEXT}\ntop\nfinal", ("fields", "classify")),
    Example("In the data, is label 'plant' more common, less common, or the same frequency as label 'rock'?",
            'classify {TEXT}\ncompare "plant" "rock"\nfinal', ("fields", "classify")),
    Example("Why did the captain leave the ship? (A) fear (B) orders (C) a storm (D) money",
            'rank "Why did the captain leave the ship" 2\nanswer\nfinal', ("rank",)),
)


def _examples(vocab: Vocabulary) -> list[Example]:
    """The examples this vocabulary can express, written with this context's field names."""
    def ok(e: Example) -> bool:
        return all((n == "fields" and vocab.fields) or n in vocab.tools for n in e.needs)

    f = vocab.fields
    ident = next((x for x in f if any(k in x.lower() for k in ("user", "id", "name"))), f[0]) if f else "User"
    text = f[-1] if f else "Text"
    return [Example(e.question, e.program.format(ID=ident, TEXT=text), e.needs) for e in EXAMPLES if ok(e)]


def _history(steps: list[Step]) -> str:
    if not steps:
        return ""
    parts = ["\nWhat you ran so far:"]
    for i, s in enumerate(steps, 1):
        parts.append(f"[program {i}]\n{s.code.strip()}\n[output {i}]\n{s.output.strip() or '(nothing printed)'}")
    return "\n".join(parts) + "\n"


def ops_prompt(question: str, info: ContextInfo, vocab: Vocabulary, steps: list[Step], window: int | None) -> str:
    fields = " (fields here: " + ", ".join(vocab.fields) + ")" if vocab.fields else ""
    ex = "\n\n".join(f"Q: {e.question}\n{e.program}" for e in _examples(vocab))
    return (
        "You cannot read `context`. Write a program that reads it for you: one operation per line, each "
        "applied to the result of the line before, starting from the context; end with final.\n"
        f"{vocab.describe()}\n\nExamples:\n\n{ex}\n\n"
        f"{info.sentence(window)}{fields}\n{_history(steps)}\nQ: {question}\n"
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
