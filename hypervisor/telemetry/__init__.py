"""Per-guest telemetry: libvirt stats, the agent's intent signals, GPUs (NVML)."""
