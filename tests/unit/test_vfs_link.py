"""The vector file system as the agent runs it: mounted at start, searched by the host over the link.

Real parts: a LinkServer and an AgentLink over a unix socket, a FUSE mount with Milvus Lite and the
packaged MiniLM, the controller's control socket and the `neuraos search` CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import HEARTBEAT_S, wait_until

from hypervisor.control import ControlError, ControlServer, call
from hypervisor.link.server import LinkServer
from hypervisor.link.transport import UnixForwardTransport
from hypervisor.search_cli import control_ops
from neuraos_agent.link import AgentConfig, AgentLink, CommandRunner
from neuraos_agent.vfs.errors import EmbedderUnavailable
from neuraos_agent.vfs.link_embedder import LinkEmbedder


def _fuse_missing() -> str | None:
    if not os.access("/dev/fuse", os.R_OK | os.W_OK) or shutil.which("fusermount3") is None:
        return "no usable FUSE here"
    try:
        from neuraos_agent.vfs.embedder import minilm_model_dir

        import pyfuse3, milvus_lite  # noqa: E401, F401
        minilm_model_dir()
    except Exception as exc:  # noqa: BLE001
        return f"the VFS cannot run here: {exc}"
    return None


def test_link_embedder_says_unavailable_when_the_host_is_away(tmp_path: Path) -> None:
    emb = LinkEmbedder(f"unix:{tmp_path / 'nobody-home.sock'}", timeout_s=2)
    with pytest.raises(EmbedderUnavailable, match="unavailable"):
        emb.embed(["a note about bread"])
    emb.close()


def test_quota_answers_are_waited_out_not_failed() -> None:
    from neuraos_agent.vfs.link_embedder import MAX_WAIT_S, quota_wait

    assert quota_wait("RESOURCE_EXHAUSTED", "guest g is over its model quota of 200 tokens/s; retry in 2.2s") == \
        pytest.approx(2.25)
    assert quota_wait("RESOURCE_EXHAUSTED", "quota; retry in 900.0s") == MAX_WAIT_S
    assert quota_wait("RESOURCE_EXHAUSTED", "guest g already has 4 model calls running") == 0.5
    assert quota_wait("UNAVAILABLE", "retry in 1s") is None


def test_control_socket_answers_and_says_when_nobody_listens(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with pytest.raises(ControlError, match="no running controller"):
        call(path, "search", {})
    with ControlServer(path, {"echo": lambda a: a, "boom": lambda a: 1 / 0}):
        assert (path.stat().st_mode & 0o777) == 0o600
        assert call(path, "echo", {"x": 1}) == {"x": 1}
        with pytest.raises(Exception, match="unknown operation"):
            call(path, "nope", {})
        with pytest.raises(Exception, match="ZeroDivisionError"):
            call(path, "boom", {})
    assert not path.exists()


@pytest.mark.skipif(_fuse_missing() is not None, reason=str(_fuse_missing()))
def test_host_search_is_answered_by_the_guest_vfs_over_the_link(tmp_path: Path) -> None:
    from neuraos_agent.vfs.boot import BootConfig, BootVFS
    from neuraos_agent.vfs.embedder import MiniLMEmbedder

    from hypervisor import cli

    transport = UnixForwardTransport(tmp_path / "link", qemu_user=None)
    mnt = tmp_path / "mnt"
    vfs = BootVFS(BootConfig(mnt, tmp_path / "files", tmp_path / "state", tmp_path / "vfs.sock"), "unused",
                  embedder=MiniLMEmbedder(batch_size=16))
    with LinkServer(transport, heartbeat_interval_s=HEARTBEAT_S) as link:
        sock = link.add_guest("g1")
        agent = AgentLink(AgentConfig(address=f"unix:{sock}", report_s=0.1, backoff_max_s=0.5),
                          CommandRunner(handlers={"search": vfs.search_command}))
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        run_dir = tmp_path / "run"
        cfg = tmp_path / "neuraos.toml"
        cfg.write_text(f'state_dir = "{tmp_path / "state-host"}"\nrun_dir = "{run_dir}"\n')
        try:
            assert agent.registered.wait(10)
            with ControlServer(run_dir / "control.sock", control_ops(link)):
                vfs.start()
                assert vfs.wait_ready(120), vfs.error
                (mnt / "notes").mkdir()
                (mnt / "notes" / "bread.txt").write_text("Knead the dough, let it rise, bake the loaf until golden.")
                (mnt / "notes" / "stars.txt").write_text("The telescope found a supernova in a distant galaxy.")
                (mnt / "other.txt").write_text("Baking sourdough at home needs a lively starter.")
                assert vfs.vfs is not None and vfs.vfs.wait_indexed(60)

                out = subprocess.run([os.sys.executable, "-m", "hypervisor.cli", "--config", str(cfg), "search",
                                      "--guest", "g1", "making bread at home", "--path-prefix", "notes/",
                                      "-k", "2", "--json"], capture_output=True, text=True, timeout=120)
                assert out.returncode == 0, out.stderr
                hits = json.loads(out.stdout)
                assert [h["path"] for h in hits] == ["notes/bread.txt", "notes/stars.txt"], hits
                assert hits[0]["vector_score"] > hits[1]["vector_score"]

                assert cli.main(["--config", str(cfg), "search", "--guest", "g1", "   "]) == 1
                assert cli.main(["--config", str(cfg), "search", "--guest", "g2", "bread"]) == 1
        finally:
            vfs.close()
            agent.stop()
            thread.join(5)
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    assert not thread.is_alive()
