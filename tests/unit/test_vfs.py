"""The vector file system on this host: a real FUSE mount, real Milvus Lite, real MiniLM vectors.

Skipped, with the reason, where /dev/fuse, fusermount3, pyfuse3, Milvus Lite or the packaged
model is missing. pyfuse3 allows one mount per process, so each test holds at most one VectorFS.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pytest


def _missing() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (no FUSE in this kernel or container)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not usable by this user"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing (apt-get install fuse3)"
    for module, hint in (("pyfuse3", "pip install pyfuse3"), ("milvus_lite", "pip install milvus-lite"),
                         ("pymilvus", "pip install pymilvus"), ("Stemmer", "pip install pystemmer")):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed ({hint})"
    try:
        from neuraos_agent.vfs.embedder import minilm_model_dir
        minilm_model_dir()
    except Exception as exc:  # noqa: BLE001
        return f"the packaged MiniLM model is missing: {exc}"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))

if _missing() is None:
    from neuraos_agent.vfs import Caller, EmbedderUnavailable, MiniLMEmbedder, VectorFS, VFSConfig
    from neuraos_agent.vfs.chunker import Chunker
    from neuraos_agent.vfs.journal import Journal
    from neuraos_agent.vfs.worker import WorkerConfig


class SwitchableEmbedder:
    """The real MiniLM behind a switch (the host going away) and a record of what was embedded."""

    def __init__(self, inner: "MiniLMEmbedder") -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.dim = inner.dim
        self.available = True
        self.embedded: list[str] = []

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not self.available:
            raise EmbedderUnavailable("host unreachable (test switch)")
        self.embedded.extend(texts)
        return self.inner.embed(texts)


@pytest.fixture(scope="module")
def minilm() -> "MiniLMEmbedder":
    emb = MiniLMEmbedder(batch_size=16)
    emb.embed(["warm up"])
    return emb


@pytest.fixture
def embedder(minilm: "MiniLMEmbedder") -> SwitchableEmbedder:
    return SwitchableEmbedder(minilm)


@pytest.fixture
def layout(tmp_path: Path) -> "VFSConfig":
    return VFSConfig(backing=tmp_path / "files", mountpoint=tmp_path / "mnt", state_dir=tmp_path / "state",
                     worker=WorkerConfig(gather_s=0.01, retry_initial_s=0.05, retry_max_s=0.2))


@contextmanager
def mounted(config: "VFSConfig", embedder: object) -> Iterator["VectorFS"]:
    vfs = VectorFS(config, embedder)  # type: ignore[arg-type]
    try:
        vfs.start()
        yield vfs
    finally:
        vfs.close()
        subprocess.run(["fusermount3", "-u", "-z", str(config.mountpoint)], capture_output=True)


def paths(hits: list) -> list[str]:
    return [h.path for h in hits]


TOPICS = {
    "kitchen/pasta.md": "# Dinner\n\nSimmer crushed tomatoes with garlic, olive oil and fresh basil, then toss "
                        "the sauce with spaghetti cooked al dente.\n",
    "garden/roses.txt": "Prune the rose bushes in late winter and feed them with compost so they bloom all summer.\n",
    "cars/engine.txt": "The mechanic replaced the timing belt and the spark plugs because the motor misfired.\n",
    "space/orbit.md": "# Launch\n\nThe rocket placed the satellite into a geostationary orbit above the equator.\n",
    "music/guitar.txt": "Tune the six strings to E A D G B E before strumming the chords of the song.\n",
}


def write_topics(root: Path) -> None:
    for rel, text in TOPICS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


# -- POSIX behaviour through the mount -----------------------------------------------------------
def test_posix_operations_pass_through(layout: "VFSConfig", embedder: SwitchableEmbedder) -> None:
    with mounted(layout, embedder) as vfs:
        m, b = layout.mountpoint, layout.backing
        (m / "a.txt").write_bytes(b"hello world\n")
        with open(m / "a.txt", "ab") as f:
            f.write(b"more\n")
            f.flush()
            os.fsync(f.fileno())
        assert (b / "a.txt").read_bytes() == b"hello world\nmore\n"  # straight to the backing store
        os.truncate(m / "a.txt", 5)
        assert (m / "a.txt").read_bytes() == b"hello"
        os.truncate(m / "a.txt", 8)
        assert (m / "a.txt").read_bytes() == b"hello\0\0\0"
        with open(m / "a.txt", "r+b") as f:
            f.seek(2)
            f.write(b"LL")
        assert (m / "a.txt").read_bytes() == b"heLLo\0\0\0"

        (m / "d" / "e").mkdir(parents=True)
        (m / "d" / "e" / "f.txt").write_text("nested")
        with pytest.raises(OSError) as exc:
            os.rmdir(m / "d")
        assert exc.value.errno == errno.ENOTEMPTY
        os.rename(m / "d", m / "d2")
        assert (m / "d2" / "e" / "f.txt").read_text() == "nested" and not (b / "d").exists()
        (m / "g.txt").write_text("old")
        os.rename(m / "a.txt", m / "g.txt")  # over an existing file
        assert (m / "g.txt").read_bytes() == b"heLLo\0\0\0" and not (m / "a.txt").exists()
        os.unlink(m / "d2" / "e" / "f.txt")
        os.rmdir(m / "d2" / "e")
        assert sorted(os.listdir(m / "d2")) == []

        os.symlink("g.txt", m / "ln")
        assert os.readlink(m / "ln") == "g.txt" and (m / "ln").read_bytes() == b"heLLo\0\0\0"
        assert os.path.islink(b / "ln")
        os.link(m / "g.txt", m / "hard.txt")
        assert os.stat(m / "g.txt").st_nlink == 2

        os.chmod(m / "g.txt", 0o640)
        os.chown(m / "g.txt", 1000, 1000)
        st = os.stat(b / "g.txt")
        assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o640, 1000, 1000)
        os.utime(m / "g.txt", ns=(1_000_000_000, 2_000_000_000))
        assert os.stat(m / "g.txt").st_mtime_ns == 2_000_000_000

        os.setxattr(m / "g.txt", "user.colour", b"blue")
        assert os.getxattr(m / "g.txt", "user.colour") == b"blue"
        assert "user.colour" in os.listxattr(m / "g.txt")
        os.removexattr(m / "g.txt", "user.colour")
        with pytest.raises(OSError):
            os.getxattr(m / "g.txt", "user.colour")

        with pytest.raises(OSError) as exc:
            (m / ".search" / "x").mkdir()
        with pytest.raises(OSError) as exc:
            (m / ".search" / "x" / "y.txt").write_text("no")
        assert exc.value.errno in (errno.EROFS, errno.EACCES)
        assert exc.value.errno in (errno.EROFS, errno.EEXIST)  # every query name "exists"
        assert ".search" not in os.listdir(m)
        assert vfs.journal is not None and vfs.journal.last_seq > 0  # closes, renames, unlinks were recorded


def test_large_file_and_concurrent_writers(layout: "VFSConfig", embedder: SwitchableEmbedder) -> None:
    embedder.available = False  # the I/O path must not care about the index at all
    with mounted(layout, embedder):
        m = layout.mountpoint
        block = os.urandom(1 << 20)
        digest = hashlib.sha256()
        with open(m / "big.bin", "wb") as f:
            for i in range(48):
                chunk = block[i:] + block[:i]
                digest.update(chunk)
                f.write(chunk)
        assert os.path.getsize(m / "big.bin") == 48 << 20
        got = hashlib.sha256()
        with open(m / "big.bin", "rb") as f:
            while part := f.read(1 << 20):
                got.update(part)
        assert got.hexdigest() == digest.hexdigest()

        fd = os.open(m / "shared.bin", os.O_CREAT | os.O_RDWR, 0o644)
        errors: list[BaseException] = []

        def writer(n: int) -> None:
            try:
                for j in range(15):
                    (m / f"w{n}-{j}.txt").write_text(f"writer {n} file {j}\n" * 50)
                os.pwrite(fd, bytes([n]) * 4096, n * 4096)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        os.close(fd)
        assert not errors
        for n in range(12):
            for j in range(15):
                assert (m / f"w{n}-{j}.txt").read_text() == f"writer {n} file {j}\n" * 50
        data = (m / "shared.bin").read_bytes()
        assert all(data[n * 4096:(n + 1) * 4096] == bytes([n]) * 4096 for n in range(12))


def test_write_only_opens_bypass_the_page_cache_and_stay_coherent(layout: "VFSConfig",
                                                                 embedder: SwitchableEmbedder) -> None:
    """Write-only opens are direct I/O (fewer round trips for large writes); readers, appenders,
    size and shared mmaps of read-write opens must still see one consistent file."""
    with mounted(layout, embedder):
        m, b = layout.mountpoint, layout.backing
        (m / "c.bin").write_bytes(b"a" * 8192)
        assert os.stat(m / "c.bin").st_blksize >= 64 * 1024  # buffered writers send large writes
        with open(m / "c.bin", "rb") as reader:
            assert reader.read(8192) == b"a" * 8192  # now in the page cache
            fd = os.open(m / "c.bin", os.O_WRONLY)
            os.pwrite(fd, b"B" * 4096, 4096)
            os.pwrite(fd, b"C" * 100, 8192)  # extends the file
            os.close(fd)
            assert os.stat(m / "c.bin").st_size == 8292
            reader.seek(0)
            assert reader.read() == b"a" * 4096 + b"B" * 4096 + b"C" * 100  # the cached page was dropped
        assert (b / "c.bin").read_bytes() == b"a" * 4096 + b"B" * 4096 + b"C" * 100

        appenders = [os.open(m / "log.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) for _ in range(2)]
        for i in range(10):
            os.write(appenders[i % 2], f"line {i}\n".encode())
        for fd in appenders:
            os.close(fd)
        assert (m / "log.txt").read_text() == "".join(f"line {i}\n" for i in range(10))

        # read-write opens keep the page cache, so shared mmaps work (in a child: CPython's msync
        # holds the GIL, which this process's FUSE thread needs to answer)
        code = ("import mmap, sys\nwith open(sys.argv[1], 'r+b') as f, mmap.mmap(f.fileno(), 0) as mm:\n"
                "    mm[0:3] = b'xyz'\n    mm.flush()\n")
        subprocess.run([sys.executable, "-c", code, str(m / "c.bin")], check=True, timeout=60)
        assert (b / "c.bin").read_bytes()[:4] == b"xyza"


# -- indexing and search -----------------------------------------------------------------------
def test_write_then_searchable_by_meaning_and_search_dir(layout: "VFSConfig", embedder: SwitchableEmbedder) -> None:
    with mounted(layout, embedder) as vfs:
        write_topics(layout.mountpoint)
        assert vfs.wait_indexed(30)
        # no query word appears in the expected file: only the meaning can find it
        assert paths(vfs.search("recipe for an Italian meal", k=3))[0] == "kitchen/pasta.md"
        assert paths(vfs.search("car repair", k=3))[0] == "cars/engine.txt"
        hit = vfs.search("spacecraft circling the earth", k=1)[0]
        assert hit.path == "space/orbit.md" and hit.vector_score is not None and hit.vector_score > 0.2
        assert "satellite" in hit.snippet
        assert paths(vfs.search("flowers", k=5, path_prefix="cars")) == ["cars/engine.txt"]

        listing = sorted(os.listdir(layout.mountpoint / ".search" / "growing flowers"))
        assert listing[0].startswith("01_") and listing[0].endswith("garden_roses.txt")
        score = float(listing[0].split("_")[1])
        assert score > float(listing[1].split("_")[1])
        link = layout.mountpoint / ".search" / "growing flowers" / listing[0]
        assert os.readlink(link) == "../../garden/roses.txt"
        assert link.read_text() == TOPICS["garden/roses.txt"]


def test_delete_and_rename_keep_the_index_right(layout: "VFSConfig", embedder: SwitchableEmbedder) -> None:
    with mounted(layout, embedder) as vfs:
        m = layout.mountpoint
        write_topics(m)
        assert vfs.wait_indexed(30)
        before = len(embedder.embedded)
        os.rename(m / "cars" / "engine.txt", m / "cars" / "motor.txt")
        os.rename(m / "space", m / "astro")
        os.unlink(m / "music" / "guitar.txt")
        assert vfs.wait_indexed(30)
        assert len(embedder.embedded) == before  # renames move vectors, they do not embed again
        indexed = set(vfs.index.files())
        assert indexed == {"kitchen/pasta.md", "garden/roses.txt", "cars/motor.txt", "astro/orbit.md"}
        assert paths(vfs.search("car repair", k=1)) == ["cars/motor.txt"]
        assert paths(vfs.search("spacecraft circling the earth", k=1)) == ["astro/orbit.md"]
        assert "music/guitar.txt" not in paths(vfs.search("playing a musical instrument", k=10))


def test_unchanged_chunks_are_not_embedded_again(layout: "VFSConfig", embedder: SwitchableEmbedder) -> None:
    sections = [f"## Part {i}\n\n" + f"Paragraph {i} talks about topic number {i} at some length. " * 8 + "\n\n"
                for i in range(4)]
    with mounted(layout, embedder) as vfs:
        doc = layout.mountpoint / "doc.md"
        doc.write_text("# Notes\n\n" + "".join(sections))
        assert vfs.wait_indexed(30)
        first = len(embedder.embedded)
        assert first == 4
        sections[2] = "## Part 2\n\nThis section was rewritten to describe volcanoes and lava.\n\n"
        doc.write_text("# Notes\n\n" + "".join(sections))
        assert vfs.wait_indexed(30)
        assert embedder.embedded[first:] == ["Notes / Part 2\nThis section was rewritten to describe volcanoes and lava."]
        os.utime(doc)  # metadata only
        assert vfs.wait_indexed(30)
        assert len(embedder.embedded) == first + 1
        assert paths(vfs.search("eruption of molten rock", k=1)) == ["doc.md"]


@pytest.fixture
def open_layout(layout: "VFSConfig") -> Iterator["VFSConfig"]:
    """A mountpoint other users can reach (pytest's tmp dirs are private to root)."""
    from dataclasses import replace

    import tempfile

    top = Path(tempfile.mkdtemp(prefix="neuraos-vfs-"))
    top.chmod(0o755)
    try:
        yield replace(layout, mountpoint=top / "mnt")
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(top / "mnt")], capture_output=True)
        shutil.rmtree(top, ignore_errors=True)


def test_permissions_are_checked_at_query_time(open_layout: "VFSConfig", embedder: SwitchableEmbedder) -> None:
    layout = open_layout
    with mounted(layout, embedder) as vfs:
        m = layout.mountpoint
        os.chmod(layout.backing, 0o755)
        os.chmod(layout.backing.parent, 0o755)
        (m / "public.txt").write_text("The quarterly budget report lists every expense.")
        (m / "alice.txt").write_text("Alice's private budget: rent, food and savings.")
        os.chown(m / "alice.txt", 1000, 1000)
        os.chmod(m / "alice.txt", 0o600)
        (m / "secret").mkdir(mode=0o700)
        (m / "secret" / "root.txt").write_text("Confidential budget figures for the board.")
        os.chmod(m / "secret" / "root.txt", 0o644)  # readable, but its directory is not searchable
        assert vfs.wait_indexed(30)
        everyone = set(paths(vfs.search("budget", k=10)))
        assert everyone == {"public.txt", "alice.txt", "secret/root.txt"}
        alice = set(paths(vfs.search("budget", k=10, caller=Caller(1000, 1000))))
        assert alice == {"public.txt", "alice.txt"}
        bob = set(paths(vfs.search("budget", k=10, caller=Caller(2000, 2000))))
        assert bob == {"public.txt"}
        os.chmod(m / "alice.txt", 0o644)  # checked live: no reindex needed
        assert "alice.txt" in paths(vfs.search("budget", k=10, caller=Caller(2000, 2000)))

        if shutil.which("setpriv"):  # the virtual directory runs the search as the calling user
            out = subprocess.run(["setpriv", "--reuid=2000", "--regid=2000", "--clear-groups",
                                  "ls", str(m / ".search" / "budget")], capture_output=True, text=True, timeout=30,
                                 cwd="/")
            assert out.returncode == 0, out.stderr
            assert not any("root.txt" in name for name in out.stdout.split())
            assert any("public.txt" in name for name in out.stdout.split())


def test_embedder_unreachable_writes_continue_and_journal_holds_work(
        layout: "VFSConfig", embedder: SwitchableEmbedder) -> None:
    embedder.available = False
    with mounted(layout, embedder) as vfs:
        start = time.monotonic()
        write_topics(layout.mountpoint)
        assert time.monotonic() - start < 5  # nothing waited for the missing host
        time.sleep(0.5)
        status = vfs.status()
        assert not status.embedder_available and status.pending_records >= len(TOPICS)
        assert vfs.index.files() == {}
        # words are indexed without the host; meaning waits for it
        assert paths(vfs.search("satellite orbit", k=1)) == ["space/orbit.md"]
        assert paths(vfs.search("recipe for an Italian meal", k=1)) == []
        embedder.available = True
        assert vfs.wait_indexed(30)
        # The worker marks the host reachable just after the batch it committed.
        deadline = time.monotonic() + 5
        while not vfs.status().embedder_available and time.monotonic() < deadline:
            time.sleep(0.05)
        assert vfs.status().pending_records == 0 and vfs.status().embedder_available
        assert paths(vfs.search("recipe for an Italian meal", k=1)) == ["kitchen/pasta.md"]


# -- crashes and corruption --------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from neuraos_agent.vfs import VectorFS, VFSConfig, EmbedderUnavailable
    class Away:
        model_id = "sentence-transformers/all-MiniLM-L6-v2"; dim = 384
        def embed(self, texts):
            raise EmbedderUnavailable("host away")
    base = Path(sys.argv[1])
    vfs = VectorFS(VFSConfig(backing=base / "files", mountpoint=base / "mnt", state_dir=base / "state"), Away())
    vfs.start()
    for i in range(20):
        (base / "mnt" / f"note{i}.txt").write_text(f"Note {i}: the lighthouse keeper watched the stormy sea.")
    (base / "mnt" / "moon.txt").write_text("Astronauts walked on the lunar surface and collected rocks.")
    print("written", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_journal_survives_kill_and_is_replayed(layout: "VFSConfig", embedder: SwitchableEmbedder) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, str(layout.backing.parent)], capture_output=True,
                             text=True, timeout=120, env=env)
        assert out.returncode == -9 and "written" in out.stdout, out.stderr[-2000:]
        with pytest.raises(OSError) as dead:
            os.stat(layout.mountpoint)  # the killed agent left its mount behind
        assert dead.value.errno == errno.ENOTCONN
        journal = Journal(layout.journal_dir)
        pending = journal.pending()
        journal.close()
        assert {r.path for r in pending} >= {f"note{i}.txt" for i in range(20)} | {"moon.txt"}
        with open(layout.journal_dir / "journal.log", "ab") as f:
            f.write(b"deadbeef {\"seq\": 99")  # a torn record at the tail
        with mounted(layout, embedder) as vfs:  # restarts over the stale mount
            assert vfs.wait_indexed(60)
            assert len(vfs.index.files()) == 21
            assert paths(vfs.search("walking on the moon", k=1)) == ["moon.txt"]
            assert vfs.journal is not None and vfs.journal.pending() == []
            assert (layout.mountpoint / "moon.txt").read_text().startswith("Astronauts")
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(layout.mountpoint)], capture_output=True)
    assert not (layout.journal_dir / "journal.log").read_bytes().endswith(b"99")


def test_journal_records_torn_tail_and_compaction(tmp_path: Path) -> None:
    with Journal(tmp_path) as j:
        for i in range(100):
            j.append("write", f"f{i}.txt")
        j.append("rename", "f1.txt", "g1.txt")
        j.commit(90)
        assert [r.seq for r in j.pending()] == list(range(91, 102))
        size = (tmp_path / "journal.log").stat().st_size
        assert j.compact(min_bytes=0)
        assert (tmp_path / "journal.log").stat().st_size < size / 5
        with open(tmp_path / "journal.log", "ab") as f:
            f.write(b"0badc0de {\"seq\": 500, \"op\": \"write\"}\n")  # damaged inside: skipped
        j.append("unlink", "f2.txt")
    with open(tmp_path / "journal.log", "ab") as f:
        f.write(b"0000")  # torn
    with Journal(tmp_path) as j:
        recs = j.pending()
        assert [r.seq for r in recs] == list(range(91, 103))
        assert recs[-2].op == "rename" and recs[-2].dst == "g1.txt" and recs[-1].op == "unlink"
        assert j.append("write", "x").seq == 103


def _tear_manifest(db: Path) -> None:
    manifest = db / "collections" / "chunks" / "manifest.json"
    raw = manifest.read_bytes()
    manifest.write_bytes(raw[: len(raw) // 2])  # Milvus Lite alone would fall back silently


def _garble_segment(db: Path) -> None:
    segment = next((db / "collections" / "chunks").rglob("*.parquet"))
    segment.write_bytes(b"not a parquet file" * 10)


@pytest.mark.parametrize("damage", [_tear_manifest, _garble_segment], ids=["torn-manifest", "garbled-segment"])
def test_corrupt_index_is_detected_and_rebuilt(layout: "VFSConfig", embedder: SwitchableEmbedder,
                                                caplog: pytest.LogCaptureFixture, damage) -> None:  # noqa: ANN001
    with mounted(layout, embedder) as vfs:
        write_topics(layout.mountpoint)
        assert vfs.wait_indexed(30)
    damage(layout.index_path)
    os.unlink(layout.backing / "music" / "guitar.txt")  # changed while the agent was down
    with caplog.at_level("ERROR", logger="neuraos.vfs"), mounted(layout, embedder) as vfs:
        assert vfs.index_rebuilds == 1
        assert any("corrupt" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
        assert vfs.wait_indexed(60)
        assert set(vfs.index.files()) == set(TOPICS) - {"music/guitar.txt"}
        assert paths(vfs.search("car repair", k=1)) == ["cars/engine.txt"]


def test_rolled_back_rows_are_reconciled_away(layout: "VFSConfig", embedder: SwitchableEmbedder) -> None:
    """Deleted rows that come back from an old manifest are removed again at start."""
    with mounted(layout, embedder) as vfs:
        write_topics(layout.mountpoint)
        assert vfs.wait_indexed(30)
    shutil.rmtree(layout.backing / "music")  # gone from the files, still in the index
    with mounted(layout, embedder) as vfs:
        assert vfs.wait_indexed(30)
        assert "music/guitar.txt" not in vfs.index.files()
        assert "music/guitar.txt" not in paths(vfs.search("playing a musical instrument", k=10))


def test_cli_search_through_the_agent_socket(layout: "VFSConfig", embedder: SwitchableEmbedder,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import replace

    from neuraos_agent.vfs import cli

    sock = layout.state_dir / "vfs.sock"
    with mounted(replace(layout, query_socket=sock), embedder) as vfs:
        write_topics(layout.mountpoint)
        assert vfs.wait_indexed(30)
        assert cli.main(["car repair", "-k", "2", "--json", "--socket", str(sock)]) == 0
        hits = json.loads(capsys.readouterr().out)
        assert [h["rank"] for h in hits] == [1, 2] and hits[0]["path"] == "cars/engine.txt"
        assert {"score", "vector_score", "bm25_score", "snippet"} <= set(hits[0])
        assert cli.main(["tomato", "--path-prefix", "kitchen", "--socket", str(sock)]) == 0
        assert "kitchen/pasta.md" in capsys.readouterr().out
    assert cli.main(["anything", "--socket", str(sock)]) == 1
    err = capsys.readouterr().err
    assert "not running" in err and "Traceback" not in err


# -- chunking (fast, no mount) -----------------------------------------------------------------
def test_chunker_by_format_keeps_offsets_and_context() -> None:
    c = Chunker(max_words=20)
    md = "# Title\n\nIntro sentence one. Intro sentence two.\n\n## Methods\n\n" + "We measured things. " * 12
    chunks = c.chunk_file("a.md", md.encode())
    assert chunks[0].context == "Title" and chunks[-1].context == "Title / Methods"
    assert all(md[ch.offset:ch.offset + len(ch.text)] == ch.text for ch in chunks)
    assert all(len(ch.text.split()) <= 20 + 20 // 3 for ch in chunks)
    code = "import os\n\ndef f():\n    return 1\n\nclass A:\n    pass\n"
    code_chunks = Chunker(max_words=5).chunk_file("m.py", code.encode())
    assert [ch.text.split()[0] for ch in code_chunks] == ["import", "def", "class"]
    assert code_chunks[0].context == "m.py"
    js = c.chunk_file("x.json", json.dumps({"user": {"name": "Ada", "langs": ["en", "fr"]}}).encode())
    assert "user.name: Ada" in js[0].text and "user.langs[1]: fr" in js[0].text
    csv_chunks = c.chunk_file("t.csv", b"city,country\nParis,France\nRome,Italy\n")
    assert csv_chunks[0].context == "city,country" and "Rome,Italy" in csv_chunks[0].text
    assert c.chunk_file("bin.dat", b"\x00\x01\x02binary") == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs that holds the backing files and the state, so both can run out of space."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_disk_full_writer_gets_enospc_and_indexing_resumes(small_disk: Path, tmp_path: Path,
                                                          embedder: SwitchableEmbedder) -> None:
    cfg = VFSConfig(backing=small_disk / "files", mountpoint=tmp_path / "mnt", state_dir=small_disk / "state",
                    worker=WorkerConfig(gather_s=0.01, retry_initial_s=0.05, retry_max_s=0.2))
    with mounted(cfg, embedder) as vfs:
        m = cfg.mountpoint
        write_topics(m)
        assert vfs.wait_indexed(30)
        with pytest.raises(OSError) as full:
            with open(m / "filler.bin", "wb") as f:
                for _ in range(64):
                    f.write(b"\0" * (1 << 20))
                f.flush()
                os.fsync(f.fileno())
        assert full.value.errno == errno.ENOSPC
        for rel, text in TOPICS.items():
            assert (m / rel).read_text() == text  # nothing already written is lost
        os.unlink(m / "filler.bin")  # space returns once FUSE's (asynchronous) release closes it
        deadline = time.monotonic() + 10
        while os.statvfs(m).f_bavail * os.statvfs(m).f_frsize < 4 << 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        (m / "late.txt").write_text("A volcano erupted and lava flowed into the sea.")
        assert vfs.wait_indexed(30)
        assert paths(vfs.search("eruption of molten rock", k=1)) == ["late.txt"]
        assert vfs.journal is not None and vfs.journal.pending() == []


def test_minilm_matches_sentence_transformers(minilm: "MiniLMEmbedder") -> None:
    """The plain-torch encoder gives sentence-transformers' vectors (first dims pinned from it)."""
    text = "A cat is sleeping on the warm windowsill."
    reference = [0.10248, -0.01583, -0.04848, 0.12296, -0.04878, 0.01571, -0.00325, 0.00173]
    alone = minilm.embed([text])[0]
    assert np.allclose(alone[:8], reference, atol=2e-4)
    assert abs(float(np.linalg.norm(alone)) - 1.0) < 1e-5
    padded = minilm.embed(["a much longer sentence " * 20, text])[1]  # padding must not change it
    assert np.allclose(alone, padded, atol=1e-5)
