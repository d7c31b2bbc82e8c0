"""`neuraos ask` on the host: contexts from files/folders/globs/stdin, the adapter over the host's
own llama.cpp backend (real SmolLM2), stored traces shown by ID, and one-line errors."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
from rich.console import Console

from hypervisor.cli import main
from hypervisor.errors import NeuraError
from hypervisor.rlm import trace_view
from hypervisor.rlm.sources import gather
from neuraos_agent.rlm.context import CorpusRef
from neuraos_agent.rlm.sandbox import namespaces_available


def _corpus(folder: Path, fact: str, files: int = 60) -> Path:
    rng = random.Random(7)
    words = "river stone ledger copper window morning harbour signal winter garden".split()
    folder.mkdir(parents=True)
    for i in range(files):
        lines = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(40)]
        if i == files // 2:
            lines.insert(20, fact)
        (folder / f"notes-{i:03d}.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_gather_contexts(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "sub" / "b.md"
    b.parent.mkdir()
    a.write_text("alpha\n")
    b.write_text("beta\n")
    (tmp_path / "sub" / "blob.bin").write_bytes(b"\0\1\2")
    ctx, src = gather([str(tmp_path / "sub")])
    assert isinstance(ctx, CorpusRef) and "folder" in src
    assert gather([str(a)]) == ("alpha\n", f"file {a}")
    docs, src = gather([str(a), str(tmp_path / "sub")])
    assert docs == [f"[{a}]\nalpha\n", f"[{b}]\nbeta\n"]  # the binary file is skipped
    docs, _ = gather([str(tmp_path / "**" / "*.md")])
    assert docs == [f"[{b}]\nbeta\n"]
    assert gather([], io.StringIO("from a pipe\n")) == ("from a pipe\n", "stdin")
    for bad in (["/no/such/place"], [str(tmp_path / "*.nothing")]):
        with pytest.raises(NeuraError):
            gather(bad)
    with pytest.raises(NeuraError, match="empty"):
        gather(["-"], io.StringIO(""))


def test_stored_traces_by_id_file_and_last(tmp_path: Path) -> None:
    doc = {"question": "q?", "context": {"kind": "text", "chars": 10, "items": 1}, "mode": "ops", "depth": 0,
           "turns": [{"index": 0, "prompt_tokens": 100, "completion_tokens": 9, "model_text": 'grep "x"\nfinal',
                      "code": "_ = context\n_ = grep(_, 'x')\nFINAL(_)", "output": "line x", "output_chars": 6,
                      "error": None, "violations": [{"kind": "network", "detail": "socket() blocked"}],
                      "final": "42", "ms": 1200.0,
                      "sub_calls": [{"kind": "llm_query", "depth": 0, "prompt_tokens": 50, "completion_tokens": 3,
                                     "ms": 80.0, "preview": "forty-two", "error": None}]}],
           "answer": "42", "finished": True, "stop_reason": "final", "children": [],
           "usage": {"model_calls": 2, "root_calls": 1, "sub_calls": 1, "tokens": 162, "wall_s": 1.3}}
    folder = tmp_path / "traces"
    folder.mkdir()
    for name in ("rlm-20260101T000000-00000001.json", "rlm-20260102T000000-00000002.json"):
        (folder / name).write_text(json.dumps(doc))
    assert trace_view.find("00000001", folder).name.endswith("01.json")
    assert trace_view.find(str(folder / "rlm-20260102T000000-00000002.json"), folder).exists()
    with pytest.raises(NeuraError, match="2 traces match"):
        trace_view.find("2026", folder)
    with pytest.raises(NeuraError, match="no trace"):
        trace_view.find("zzz", folder)
    console = Console(record=True, width=140)
    console.print(trace_view.render(trace_view.load(folder / "rlm-20260101T000000-00000001.json")))
    text = console.export_text()
    for want in ("turn 0", "grep(_, 'x')", "blocked network", "llm_query", "forty-two", "answer: 42",
                 "2 model calls (1 root, 1 sub)"):
        assert want in text, text
    (folder / "junk.json").write_text("{}")
    with pytest.raises(NeuraError, match="not an RLM trace"):
        trace_view.load(folder / "junk.json")


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "neuraos.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    for argv, want in ((["ask", "q", "-c", str(tmp_path / "missing")], "no such file or folder"),
                       (["ask", "--trace", "nope"], "no trace 'nope'"),
                       (["ask", "q", "--trace", "x", "-c", str(cfg)], "only without a question"),
                       (["ask", "q", "-c", str(cfg), "--max-sub-calls", "0"], "--max-sub-calls must be")):
        assert main(["--config", str(cfg), *argv]) == 1
        err = capsys.readouterr().err
        assert want in err and "Traceback" not in err, err


needs_model = pytest.mark.skipif(
    not namespaces_available() or __import__("importlib").util.find_spec("llama_cpp") is None,
    reason="needs user namespaces and llama-cpp-python")


@needs_model
def test_backend_client_fits_the_window() -> None:
    from hypervisor.inference.backends import LlamaCppBackend, LlamaCppConfig, llama_cpp_missing
    from hypervisor.rlm.backend_client import BackendClient

    if llama_cpp_missing():
        pytest.skip(llama_cpp_missing())
    backend = LlamaCppBackend(LlamaCppConfig(slots=1, n_ctx=512))
    try:
        client = BackendClient(backend)
        long = "Remember: the answer is yes.\n" + "filler words go here. " * 2000 + "\nIs the answer yes? Say yes."
        c = client.complete(long, max_tokens=8)
        assert c.truncated and c.prompt_tokens + 8 <= 512 and c.completion_tokens >= 1
        c = client.complete("Say hi.", max_tokens=4, grammar='root ::= "hi"')
        assert c.text == "hi" and not c.truncated
    finally:
        backend.close()


@needs_model
def test_ask_end_to_end_with_the_host_backend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The real SmolLM2 in this process finds a fact planted in 60 files, and the trace it wrote
    is shown again by ID."""
    from hypervisor.inference.backends import llama_cpp_missing

    if llama_cpp_missing():
        pytest.skip(llama_cpp_missing())
    number = str(random.randrange(1_000_000, 10_000_000))
    docs = _corpus(tmp_path / "docs", f"The special magic number for falcon is {number}.")
    cfg = tmp_path / "neuraos.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    rc = main(["--config", str(cfg), "ask", "What is the special magic number for falcon mentioned in the provided text?",
               "-c", str(docs), "--json", "--trace", "--threads", "2", "--max-turns", "3"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["finished"] and doc["answer"] == number, doc
    assert doc["usage"]["root_calls"] >= 1 and doc["trace"]["context"]["items"] == 60
    assert all(t["prompt_tokens"] < 2048 for t in doc["trace"]["turns"])
    assert (tmp_path / "state" / "rlm-traces" / Path(doc["trace_path"]).name).exists()
    rc = main(["--config", str(cfg), "ask", "--trace", doc["trace_id"]])
    shown = capsys.readouterr().out
    assert rc == 0 and "grep(" in shown and f"answer: {number}" in shown


@pytest.mark.skipif(not namespaces_available(), reason="needs user namespaces")
def test_ask_uses_the_configured_endpoint_in_python_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          chat_server: tuple[str, list[dict], list[str]]) -> None:
    """`rlm_endpoint` in the config sends the root's turns to an OpenAI-compatible server (a local
    test double here) and the root writes Python; the context never reaches the server."""
    url, seen, replies = chat_server
    replies += ["```repl\nhits = grep(context, 'falcon is')\nprint(hits)\n```",
                "```repl\nFINAL(extract(hits[0], r'\\d+')[0])\n```"]
    docs = _corpus(tmp_path / "docs", "The special magic number for falcon is 4242.")
    cfg = tmp_path / "neuraos.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n'
                   f'rlm_endpoint = "{url}"\nrlm_model = "big"\n')
    rc = main(["--config", str(cfg), "ask", "falcon number?", "-c", str(docs), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["answer"] == "4242" and doc["model"].startswith("big at http://127.0.0.1")
    assert len(seen) == 2 and all(r["model"] == "big" for r in seen)
    assert "4242" not in seen[0]["messages"][0]["content"] and "4242" in seen[1]["messages"][0]["content"]
    assert "Python REPL" in seen[0]["messages"][0]["content"]  # python mode for an endpoint
