"""One TOML file with documented defaults (`/etc/neuraos/neuraos.toml`).

Every key is optional; what a file leaves out takes the default below. Unknown keys
are an error, so a typo never silently does nothing.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from hypervisor.errors import NeuraError

DEFAULT_PATH = Path("/etc/neuraos/neuraos.toml")


@dataclass(frozen=True)
class GuestDefaults:
    vcpus: int = 1             # vCPUs online at boot
    max_vcpus: int = 4         # hot-plug ceiling (maxvcpus)
    memory_mib: int = 768      # balloon target at boot
    max_memory_mib: int = 1536  # the guest's maximum memory
    tb_cache_mib: int = 128    # TCG translation cache (QEMU's default is 1 GiB+)


@dataclass(frozen=True)
class Config:
    uri: str = "qemu:///system"
    accel: str = "auto"                      # auto | kvm | tcg
    state_dir: Path = Path("/var/lib/neuraos")
    run_dir: Path = Path("/run/neuraos")
    image_cache: Path = Path("/var/cache/neuraos/images")
    heartbeat_s: float = 2.0                 # agent heartbeat interval it is told
    agent_timeout_s: float = 180.0           # boot-to-agent wait in `up`
    rlm_endpoint: str = ""                   # `neuraos ask`: an OpenAI-compatible URL; "": llama.cpp here
    rlm_model: str = "default"               # the model name at rlm_endpoint
    guest: GuestDefaults = field(default_factory=GuestDefaults)

    @property
    def store_path(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def guests_dir(self) -> Path:
        return self.state_dir / "guests"


def load(path: Path | None = None) -> Config:
    """Load the config file; a missing default file means all defaults."""
    p = path or DEFAULT_PATH
    if not p.exists():
        if path is not None:
            raise NeuraError(f"config file {p} does not exist")
        return Config()
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise NeuraError(f"{p}: {e}", "fix the TOML syntax") from None
    return from_dict(data, str(p))


def from_dict(data: dict, where: str = "config") -> Config:
    cfg = Config()
    known = {f.name: f for f in fields(Config)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise NeuraError(f"{where}: unknown key {key!r}", f"known keys: {', '.join(known)}")
        if key == "guest":
            gknown = {f.name for f in fields(GuestDefaults)}
            bad = set(value) - gknown
            if bad:
                raise NeuraError(f"{where}: unknown key guest.{sorted(bad)[0]}")
            value = replace(GuestDefaults(), **value)
        elif isinstance(getattr(cfg, key), Path):
            value = Path(value)
        kwargs[key] = value
    return replace(cfg, **kwargs)
