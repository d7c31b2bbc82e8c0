"""`neuraos-agent`: run the link to the host, or print this guest's status."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from dataclasses import asdict

from neuraos_agent import __version__


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def build_parser(tools: bool = True) -> argparse.ArgumentParser:
    """`tools` adds search and ask, whose modules are heavy: `run` never loads them."""
    parser = argparse.ArgumentParser(prog="neuraos-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"neuraos-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="link to the host controller and serve it until SIGTERM")
    run.add_argument("--link", metavar="ADDR", default=None,
                     help="controller address (default: $NEURAOS_LINK, else 10.0.2.100:50051; "
                          "vsock:2:50051 on vsock hosts)")
    run.add_argument("--heartbeat", metavar="S", type=_positive, default=None,
                     help="seconds between heartbeats (default: what the host asks for)")
    run.add_argument("--report", metavar="S", type=_positive, default=5.0,
                     help="seconds between status reports (default: 5)")
    run.add_argument("--guest", metavar="NAME", default=os.environ.get("NEURAOS_GUEST", ""),
                     help="the guest name we believe we have; the host refuses a wrong one "
                          "(default: $NEURAOS_GUEST, else no claim)")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_vfs_run_arguments(run)

    status = sub.add_parser("status", help="print this guest's status as the host would see it")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    from neuraos_agent.monitor.cli import add_monitor_parsers

    add_monitor_parsers(sub)  # profiles, monitor
    if tools:
        from neuraos_agent.rlm.cli import add_ask_parser
        from neuraos_agent.vfs.cli import add_search_parser, cmd_search

        add_search_parser(sub).set_defaults(func=cmd_search)
        add_ask_parser(sub)  # sets func=cmd_ask
        from neuraos_agent.vfs.cli import add_status_parser

        add_status_parser(sub)  # vfs-status; sets func
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from neuraos_agent.link import AgentConfig, AgentLink, CommandRunner, default_link_address
    from neuraos_agent.vsock_bridge import VsockBridge, parse_vsock

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    address = args.link or default_link_address()
    vsock = parse_vsock(address)
    if vsock is not None:  # gRPC from PyPI cannot dial vsock: bridge it through loopback
        address = VsockBridge(*vsock).address
    vfs = boot_vfs(args, address)
    runner = CommandRunner(handlers={"search": vfs.search_command} if vfs else None)
    agent = AgentLink(AgentConfig(
        address=address,
        heartbeat_s=args.heartbeat,
        report_s=args.report,
        claimed_guest=args.guest,
    ), runner)
    from neuraos_agent.monitor.service import start_in_background

    start_in_background(agent)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    logging.getLogger("neuraos.agent").info("neuraos-agent %s linking to %s", __version__, agent.config.address)
    try:
        agent.run()
    finally:
        if vfs is not None:
            vfs.close()
    return 0


def add_vfs_run_arguments(run: argparse.ArgumentParser) -> None:
    from neuraos_agent.vfs import boot

    run.add_argument("--vfs-mount", metavar="DIR", default=boot.env_default("NEURAOS_VFS_MOUNT", boot.DEFAULT_MOUNT),
                     help="where the vector file system is mounted (default: $NEURAOS_VFS_MOUNT, else %(default)s)")
    run.add_argument("--vfs-backing", metavar="DIR",
                     default=boot.env_default("NEURAOS_VFS_BACKING", boot.DEFAULT_BACKING),
                     help="where its files are kept (default: $NEURAOS_VFS_BACKING, else %(default)s)")
    run.add_argument("--vfs-state", metavar="DIR", default=boot.env_default("NEURAOS_VFS_STATE", boot.DEFAULT_STATE),
                     help="its journal and index (default: $NEURAOS_VFS_STATE, else %(default)s)")
    run.add_argument("--no-vfs", dest="vfs", action="store_false", default=boot.enabled_by_env(),
                     help="do not mount the vector file system (also: NEURAOS_VFS=off)")


def boot_vfs(args: argparse.Namespace, link_address: str):  # noqa: ANN201 - BootVFS | None
    """Start mounting the vector file system in the background (the link does not wait for it)."""
    if not args.vfs:
        return None
    from pathlib import Path

    from neuraos_agent.vfs.boot import BootConfig, BootVFS

    vfs = BootVFS(BootConfig(Path(args.vfs_mount), Path(args.vfs_backing), Path(args.vfs_state)), link_address)
    vfs.start()
    return vfs


def cmd_status(args: argparse.Namespace) -> int:
    from neuraos_agent.status import read_status

    try:
        status = read_status()
    except (OSError, ValueError) as exc:
        print(f"neuraos-agent: cannot read guest status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(status), indent=2))
        return 0
    gib = 1024 * 1024
    print(f"agent       {status.agent_version}")
    print(f"kernel      {status.kernel}")
    print(f"boot id     {status.boot_id}")
    print(f"uptime      {status.uptime_s:.0f} s")
    print(f"load        {status.load1:.2f} {status.load5:.2f} {status.load15:.2f}")
    print(f"memory      {status.mem_available_kib / gib:.2f} of {status.mem_total_kib / gib:.2f} GiB available")
    print(f"cpus        {status.cpus_online} online of {status.cpus_present} present")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(tools=not argv or argv[0] not in ("run", "status")).parse_args(argv)
    handlers = {"run": cmd_run, "status": cmd_status}
    return handlers[args.command](args) if args.command in handlers else args.func(args)


if __name__ == "__main__":
    sys.exit(main())
