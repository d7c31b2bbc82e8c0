"""The monitor inside `neuraos-agent run`: started in the background, alerts out over the link.

Loading numpy and the model takes tens of seconds in a slow guest, so the link comes up
first and the monitor joins it when ready. Opt-in for now (NEURAOS_MONITOR=on in agent.env):
under TCG its threads and bpftrace still cost about a fifth of a vCPU on a busy guest (a
line per syscall cost 40%; see the VM test's report), over the 5% goal.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict

log = logging.getLogger("neuraos.monitor")


def alert_message(alert):  # -> link_pb2.AlertReport
    from neuraos_agent._gen import link_pb2

    return link_pb2.AlertReport(**asdict(alert))


def start_in_background(agent) -> threading.Thread | None:
    """Start the monitor for `agent` (an AgentLink) when NEURAOS_MONITOR=on."""
    if os.environ.get("NEURAOS_MONITOR", "off").lower() not in ("on", "1", "yes"):
        log.info("behaviour monitor off (set NEURAOS_MONITOR=on in /etc/neuraos/agent.env)")
        return None

    def run() -> None:
        try:
            from neuraos_agent.monitor.engine import Monitor, MonitorConfig
            from neuraos_agent.status import read_boot_id

            config = MonitorConfig(mode=os.environ.get("NEURAOS_MONITOR_MODE", "observe"))
            monitor = Monitor(config, on_alert=lambda a: agent.send_alert(alert_message(a)),
                              boot_id=read_boot_id())
            monitor.start()
            agent.runner.monitor = monitor
            agent.monitor = monitor
            log.info("behaviour monitor running (mode %s, model %s)", monitor.stats.mode, monitor.model_id)
        except Exception:
            log.exception("behaviour monitor failed to start; the agent runs without it")

    t = threading.Thread(target=run, name="neuraos-monitor-start", daemon=True)
    t.start()
    return t
