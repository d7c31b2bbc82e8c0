"""GPU thermal and power headroom through NVML (nvidia-ml-py).

Reads temperature, power, clocks and throttle reasons; `HeadroomGuard` lowers the
power limit before the GPU reaches its slowdown temperature (or as soon as a
thermal/power-brake throttle appears) and gives the power back when it is cool.
On a host without an NVIDIA driver, `open_nvml()` says so and everything is a no-op.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("neuraos.telemetry.nvml")

THROTTLE_NAMES = {
    0x0000000000000002: "applications_clocks_setting",
    0x0000000000000004: "sw_power_cap",
    0x0000000000000008: "hw_slowdown",
    0x0000000000000020: "sw_thermal_slowdown",
    0x0000000000000040: "hw_thermal_slowdown",
    0x0000000000000080: "hw_power_brake_slowdown",
}
THERMAL_OR_BRAKE = 0x08 | 0x20 | 0x40 | 0x80


@dataclass(frozen=True)
class GpuSample:
    index: int
    name: str
    temp_c: float
    slowdown_temp_c: float | None
    power_w: float
    power_limit_w: float
    min_limit_w: float
    max_limit_w: float
    sm_clock_mhz: int
    max_sm_clock_mhz: int
    throttle_mask: int

    @property
    def throttle_reasons(self) -> list[str]:
        return [n for bit, n in THROTTLE_NAMES.items() if self.throttle_mask & bit]


@dataclass(frozen=True)
class GpuAction:
    index: int
    power_limit_w: float
    reason: str


class Nvml(Protocol):
    def samples(self) -> list[GpuSample]: ...
    def set_power_limit(self, index: int, watts: float) -> None: ...


class NvmlUnavailable(Exception):
    """No NVIDIA driver or no GPU: the message says which."""


class PynvmlBackend:
    """The real NVML through nvidia-ml-py."""

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as e:
            raise NvmlUnavailable("nvidia-ml-py is not installed") from e
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            raise NvmlUnavailable(f"no NVIDIA driver: {e}") from None
        self.nv = pynvml
        self.count = pynvml.nvmlDeviceGetCount()
        if self.count == 0:
            raise NvmlUnavailable("NVIDIA driver loaded but no GPU present")

    def _handle(self, i: int) -> Any:
        return self.nv.nvmlDeviceGetHandleByIndex(i)

    def samples(self) -> list[GpuSample]:
        nv, out = self.nv, []
        for i in range(self.count):
            h = self._handle(i)
            try:
                slow = float(nv.nvmlDeviceGetTemperatureThreshold(h, nv.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN))
            except nv.NVMLError:
                slow = None
            lo, hi = nv.nvmlDeviceGetPowerManagementLimitConstraints(h)
            name = nv.nvmlDeviceGetName(h)
            out.append(GpuSample(
                index=i, name=name.decode() if isinstance(name, bytes) else name,
                temp_c=float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
                slowdown_temp_c=slow,
                power_w=nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
                power_limit_w=nv.nvmlDeviceGetPowerManagementLimit(h) / 1000.0,
                min_limit_w=lo / 1000.0, max_limit_w=hi / 1000.0,
                sm_clock_mhz=nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
                max_sm_clock_mhz=nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM),
                throttle_mask=nv.nvmlDeviceGetCurrentClocksThrottleReasons(h),
            ))
        return out

    def set_power_limit(self, index: int, watts: float) -> None:
        self.nv.nvmlDeviceSetPowerManagementLimit(self._handle(index), int(watts * 1000))


def open_nvml() -> tuple[Nvml | None, str]:
    """The NVML backend and a one-line status; (None, why) where there is no GPU."""
    try:
        nv = PynvmlBackend()
    except NvmlUnavailable as e:
        return None, str(e)
    return nv, f"{nv.count} NVIDIA GPU(s) through NVML"


@dataclass
class HeadroomGuard:
    """Keep each GPU `margin_c` below its slowdown temperature by trading power for heat."""

    margin_c: float = 5.0
    step_frac: float = 0.05     # of the max limit, per tick
    cool_c: float = 10.0        # restore power once this far below slowdown

    def plan(self, samples: list[GpuSample]) -> list[GpuAction]:
        actions = []
        for s in samples:
            slow = s.slowdown_temp_c or 90.0
            step = self.step_frac * s.max_limit_w
            hot = s.temp_c >= slow - self.margin_c or bool(s.throttle_mask & THERMAL_OR_BRAKE)
            if hot and s.power_limit_w > s.min_limit_w:
                target = max(s.min_limit_w, s.power_limit_w - step)
                why = (f"{s.temp_c:.0f}°C within {self.margin_c:.0f}°C of slowdown {slow:.0f}°C"
                       if s.temp_c >= slow - self.margin_c else f"throttling: {', '.join(s.throttle_reasons)}")
                actions.append(GpuAction(s.index, target, why))
            elif s.temp_c <= slow - self.cool_c and s.power_limit_w < s.max_limit_w and not s.throttle_mask & THERMAL_OR_BRAKE:
                target = min(s.max_limit_w, s.power_limit_w + step)
                actions.append(GpuAction(s.index, target, f"{s.temp_c:.0f}°C is cool: power back"))
        return actions

    def apply(self, nvml: Nvml, actions: list[GpuAction]) -> list[GpuAction]:
        done = []
        for a in actions:
            try:
                nvml.set_power_limit(a.index, a.power_limit_w)
                done.append(a)
                log.info("GPU %d power limit → %.0f W (%s)", a.index, a.power_limit_w, a.reason)
            except Exception as e:  # NVML needs root; report, don't stop the loop
                log.warning("GPU %d power limit not set: %s", a.index, e)
        return done
