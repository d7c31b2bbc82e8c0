"""`neuraos`: the operator's command line.

Every expected failure prints one line and a hint (exit 1), never a traceback;
every command takes --json for scripts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from hypervisor import __version__
from hypervisor.config import Config, load
from hypervisor.errors import NeuraError

REPO = Path(__file__).resolve().parents[1]
out = Console()
err = Console(stderr=True)


def _age(ts: float | None) -> str:
    if not ts:
        return "never"
    return f"{max(0.0, time.time() - ts):.0f}s ago"


def _connect(cfg: Config):
    from hypervisor.virt.connection import Connection
    from hypervisor.virt.daemons import ensure_daemons

    ensure_daemons()
    c = Connection(cfg.uri)
    c.open()
    return c


def _guest_rows(cfg: Config, conn, store=None) -> list[dict]:
    """One row per libvirt guest with its agent's last report; `store` reused when given."""
    from hypervisor.state import Store
    from hypervisor.virt import domains

    own = store is None
    if own:
        store = Store(cfg.store_path)
    recs = {r.name: r for r in store.guests()}
    rows = []
    for d in domains.list_all(conn):
        r = recs.get(d.name)
        st = (r.status or {}) if r else {}
        rows.append({
            "name": d.name, "state": d.state, "neuraos": d.neuraos,
            "vcpus_plugged": d.vcpus, "vcpus_online": st.get("cpus_online"), "max_vcpus": d.max_vcpus,
            "memory_mib": d.memory_mib, "max_memory_mib": d.max_memory_mib,
            "mem_available_mib": (st.get("mem_available_kib") or 0) // 1024 or None,
            "load1": st.get("load1"), "last_heartbeat": r.last_heartbeat if r else None,
            "heartbeats": r.heartbeats if r else 0, "ssh_port": d.ssh_port,
        })
    if own:
        store.close()
    return rows


def _table(rows: list[dict], title: str = "NeuraOS guests") -> Table:
    t = Table(title=title)
    for col in ("guest", "state", "vCPUs online/plugged/max", "memory MiB (avail)", "load1", "agent", "ssh"):
        t.add_column(col)
    for r in rows:
        online = "?" if r["vcpus_online"] is None else str(r["vcpus_online"])
        avail = f" ({r['mem_available_mib']})" if r["mem_available_mib"] else ""
        t.add_row(r["name"], r["state"], f"{online}/{r['vcpus_plugged']}/{r['max_vcpus']}",
                  f"{r['memory_mib']}/{r['max_memory_mib']}{avail}",
                  "" if r["load1"] is None else f"{r['load1']:.2f}",
                  _age(r["last_heartbeat"]), f"127.0.0.1:{r['ssh_port']}" if r["ssh_port"] else "")
    return t


def cmd_up(args: argparse.Namespace, cfg: Config) -> int:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from hypervisor.controller import Controller
    from hypervisor.link.server import LinkServer
    from hypervisor.inference.cli import snapshot_path
    from hypervisor.inference.host import ModelHost, ModelHostConfig
    from hypervisor.link.transport import detect_transport
    from hypervisor.link.vsock_relay import CidTable, VsockRelay, VsockRelayTransport, vsock_listener
    from hypervisor.state import Store
    from hypervisor.virt.accel import detect_accel
    from hypervisor.virt.daemons import ensure_daemons, ensure_qemu_conf, restart_libvirtd
    from hypervisor.virt.image import ensure_image
    from hypervisor import search_cli
    from hypervisor.control import ControlServer, control_path

    say = (lambda m: None) if args.json else (lambda m: out.print(f"[bold]•[/] {m}"))
    started = ensure_daemons()
    for s in started:
        if s.started:
            say(f"started {s.name}")
    if ensure_qemu_conf():
        say("set seccomp_sandbox = 0 in qemu.conf (the link spawns socat); restarting libvirtd")
        restart_libvirtd()
    accel = detect_accel(cfg.accel)
    say(f"accelerator: [bold]{accel.kind.upper()}[/] — {accel.reason}")
    t0 = time.monotonic()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err, transient=True, disable=args.json) as progress:
        image = ensure_image(REPO, cfg.image_cache, progress=progress)
    say(f"guest image {image.key[:12]} {'built' if image.built else 'cached'} in {time.monotonic() - t0:.1f}s")
    with ExitStack() as stack:
        conn = stack.enter_context(_connect_ctx(cfg))
        store = Store(cfg.store_path)
        stack.callback(store.close)
        choice = detect_transport(cfg.run_dir / "link")
        transport = choice.transport
        say(f"link: [bold]{transport.kind}[/] — {choice.reason}")
        models = stack.enter_context(ModelHost(ModelHostConfig(
            snapshot_path=snapshot_path(cfg), kv_nvme_dir=cfg.state_dir / "kv")))
        for why in models.unavailable:
            say(f"model service: [yellow]{why}[/]")
        from hypervisor.security.actions import ActionPump
        from hypervisor.security.alerts import AlertStore
        from hypervisor.security.cli import store_path as security_db

        alerts = AlertStore(security_db(cfg))
        stack.callback(alerts.close)
        link = stack.enter_context(LinkServer(transport, heartbeat_interval_s=cfg.heartbeat_s,
                                              services=models.service.handlers, on_alert=alerts.record))
        stack.enter_context(ControlServer(control_path(cfg), search_cli.control_ops(link)))
        stack.enter_context(ActionPump(link, alerts))
        cids = None
        if isinstance(transport, VsockRelayTransport):
            cids = CidTable(transport)
            stack.enter_context(VsockRelay(vsock_listener(transport.port), cids.route))
        ctl = Controller(cfg, conn, link, store, transport, accel, cids)
        for name in ctl.reattach():
            say(f"re-attached link of running guest {name}")
        boot = ctl.up(args.name, image, vcpus=args.vcpus, memory_mib=args.memory, gpu=args.gpu, notify=say)
        if args.json:
            print(json.dumps({"guest": args.name, "accel": asdict(accel), "image": image.key,
                              "image_built": image.built, "boot_to_agent_s": boot,
                              "guests": _guest_rows(cfg, conn, store)}))
        if args.detach:
            return 0
        from hypervisor.scheduler.loop import controller_loop

        sched = stack.enter_context(controller_loop(ctl, cfg.state_dir))
        say(f"scheduler: every {sched.cfg.tick_s:g} s (`neuraos top`); GPU guard: {sched.gpu_status}")
        say("controller running; Ctrl-C stops it (guests keep running)")
        deadline = time.monotonic() + args.for_s if args.for_s else None
        with Live(_table(_guest_rows(cfg, conn, store)), console=out, refresh_per_second=1,
                  transient=False, auto_refresh=False) as live:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(1.0)
                try:
                    live.update(_table(_guest_rows(cfg, conn, store)), refresh=True)
                except NeuraError as e:  # libvirtd restarting: keep serving the link
                    live.update(Table(title=f"waiting: {e}"), refresh=True)
    return 0


class _connect_ctx:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def __enter__(self):
        self.c = _connect(self.cfg)
        return self.c

    def __exit__(self, *exc: object) -> None:
        self.c.close()


def cmd_down(args: argparse.Namespace, cfg: Config) -> int:
    from hypervisor.state import Store
    from hypervisor.virt import domains

    with _connect_ctx(cfg) as conn:
        domains.stop(conn, args.name, timeout=args.timeout)
        domains.undefine(conn, args.name)
    store = Store(cfg.store_path)
    if not args.keep_disk:
        (cfg.guests_dir / args.name / "disk.qcow2").unlink(missing_ok=True)
        store.drop_guest(args.name)
    store.event(args.name, "down", "")
    store.close()
    if args.json:
        print(json.dumps({"guest": args.name, "down": True}))
    else:
        out.print(f"{args.name} is down")
    return 0


def cmd_list(args: argparse.Namespace, cfg: Config) -> int:
    with _connect_ctx(cfg) as conn:
        rows = _guest_rows(cfg, conn)
    if args.json:
        print(json.dumps(rows))
    elif not rows:
        out.print("no guests; `neuraos up` boots one")
    else:
        out.print(_table(rows))
    return 0


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    from hypervisor.state import Store
    from hypervisor.virt import domains

    with _connect_ctx(cfg) as conn:
        d = domains.info(conn, args.name)
        pol = domains.policy(conn, args.name)
        row = next((r for r in _guest_rows(cfg, conn) if r["name"] == args.name), None)
    store = Store(cfg.store_path)
    rec = store.guest(args.name)
    events = store.events(args.name, limit=10)
    store.close()
    doc = {"domain": asdict(d), "policy": asdict(pol), "agent": rec.status if rec else None,
           "last_heartbeat": rec.last_heartbeat if rec else None,
           "heartbeats": rec.heartbeats if rec else 0,
           "events": [asdict(e) for e in events]}
    if args.json:
        print(json.dumps(doc))
        return 0
    out.print(_table([row] if row else [], title=f"guest {args.name}"))
    out.print(f"policy: vCPUs {pol.min_vcpus}–{pol.max_vcpus}, memory {pol.min_memory_mib}–"
              f"{pol.max_memory_mib} MiB, priority {pol.priority}")
    if rec and rec.status:
        s = rec.status
        out.print(f"agent {s.get('agent_version')} up {s.get('uptime_s', 0):.0f}s, kernel {s.get('kernel')}, "
                  f"load {s.get('load1', 0):.2f}, memory {s.get('mem_available_kib', 0) // 1024}/"
                  f"{s.get('mem_total_kib', 0) // 1024} MiB available")
    else:
        out.print("agent: no report yet")
    for e in events:
        out.print(f"  {time.strftime('%H:%M:%S', time.localtime(e.at))} {e.kind} {e.detail}")
    return 0


def cmd_console(args: argparse.Namespace, cfg: Config) -> int:
    from hypervisor.virt import domains

    with _connect_ctx(cfg) as conn:
        domains.info(conn, args.name)  # clear error if it does not exist
    if not sys.stdin.isatty():
        log = cfg.guests_dir / args.name / "console.log"
        raise NeuraError("console needs a terminal", f"the boot log is in {log}")
    os.execvp("virsh", ["virsh", "-c", cfg.uri, "console", args.name])
    return 0


def cmd_policy(args: argparse.Namespace, cfg: Config) -> int:
    from dataclasses import replace

    from hypervisor.virt import domains

    with _connect_ctx(cfg) as conn:
        pol = domains.policy(conn, args.name)
        changes = {k: v for k, v in {
            "min_vcpus": args.min_vcpus, "max_vcpus": args.max_vcpus, "min_memory_mib": args.min_mem,
            "max_memory_mib": args.max_mem, "priority": args.priority}.items() if v is not None}
        if changes:
            new = replace(pol, **changes)
            if new.min_vcpus < 1 or new.min_vcpus > new.max_vcpus:
                raise NeuraError(f"vCPU bounds [{new.min_vcpus}, {new.max_vcpus}] are not a range of at least 1")
            if new.min_memory_mib < 64 or new.min_memory_mib > new.max_memory_mib:
                raise NeuraError(f"memory bounds [{new.min_memory_mib}, {new.max_memory_mib}] MiB are not a range")
            domains.set_policy(conn, args.name, new)
            pol = new
    if args.json:
        print(json.dumps({"guest": args.name, "policy": asdict(pol)}))
    else:
        out.print(f"{args.name}: vCPUs {pol.min_vcpus}–{pol.max_vcpus}, memory {pol.min_memory_mib}–"
                  f"{pol.max_memory_mib} MiB, priority {pol.priority}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neuraos", description="NeuraOS host controller")
    p.add_argument("--version", action="version", version=f"neuraos {__version__}")
    p.add_argument("--config", type=Path, help="TOML config (default /etc/neuraos/neuraos.toml)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name: str, fn, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.set_defaults(fn=fn)
        return sp

    up = add("up", cmd_up, "build the image if needed, boot a guest, wait for its agent, run the controller")
    up.add_argument("name", nargs="?", default="neura-1")
    up.add_argument("--vcpus", type=int)
    up.add_argument("--memory", type=int, help="boot memory in MiB")
    up.add_argument("--gpu", help="PCI address of a GPU to pass through (VFIO), e.g. 0000:01:00.0")
    up.add_argument("--detach", action="store_true", help="return once the agent answers")
    up.add_argument("--for", dest="for_s", type=float, help="run the controller this many seconds")
    down = add("down", cmd_down, "shut a guest down and undefine it")
    down.add_argument("name")
    down.add_argument("--keep-disk", action="store_true")
    down.add_argument("--timeout", type=float, default=30.0)
    add("list", cmd_list, "guests with their allocation and agent status")
    st = add("status", cmd_status, "one guest in detail")
    st.add_argument("name")
    pol = add("policy", cmd_policy, "show or set a guest's scheduling bounds (kept in its domain metadata)")
    pol.add_argument("name")
    pol.add_argument("--min-vcpus", type=int)
    pol.add_argument("--max-vcpus", type=int)
    pol.add_argument("--min-mem", type=int, help="MiB")
    pol.add_argument("--max-mem", type=int, help="MiB")
    pol.add_argument("--priority", type=int, help="higher wins when the host is short")
    from hypervisor.inference.cli import cmd_kv, cmd_models

    add("models", cmd_models, "model backends, loaded models and the running model service")
    add("kv", cmd_kv, "KV cache tiers, occupancy and hit rates per guest")
    from hypervisor.scheduler.cli import register as register_scheduler

    register_scheduler(add)
    from hypervisor.rlm.cli import register as register_ask

    register_ask(add)
    con = add("console", cmd_console, "attach to a guest's serial console")
    con.add_argument("name")
    from hypervisor import search_cli

    search_cli.register(add)
    from hypervisor.security.cli import register as register_security

    register_security(add)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load(args.config)
        return args.fn(args, cfg)
    except NeuraError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        if e.hint:
            err.print(f"[dim]hint:[/] {e.hint}", highlight=False)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
