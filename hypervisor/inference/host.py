"""Bring the model service up with whatever this machine can run, and own its lifetime.

A missing backend is not fatal: the controller still serves guests, and calls that need the
absent model get UNAVAILABLE with the reason (the same reason `neuraos models` shows).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from hypervisor.inference.backends import (
    Backend, LlamaCppBackend, LlamaCppConfig, VllmBackend, VllmConfig,
)
from hypervisor.inference.embed import EmbedBatcher, MiniLMEmbedder
from hypervisor.inference.errors import BackendUnavailable, InvalidRequest
from hypervisor.inference.parking import ParkingStore, StateStore
from hypervisor.inference.quotas import GuestQuota
from hypervisor.inference.service import ModelService, ServiceConfig

log = logging.getLogger("neuraos.inference")


@dataclass(frozen=True)
class ModelHostConfig:
    backend: str = "llama.cpp"  # llama.cpp | vllm | none
    llama: LlamaCppConfig = LlamaCppConfig()
    vllm_model: str = ""  # HF-format model directory for the vLLM server
    vllm_url: str | None = None  # an existing OpenAI-compatible vLLM server instead of our own
    embeddings: bool = True
    embed_window_ms: float = 5.0
    embed_threads: int | None = None
    kv_ram_mib: int = 1024
    kv_nvme_dir: Path | None = None
    kv_nvme_mib: int = 8192
    quota: GuestQuota = GuestQuota()
    guest_quotas: dict[str, GuestQuota] = field(default_factory=dict)
    snapshot_path: Path | None = None


def _restore_cost():
    """The measured restore-vs-recompute costs the service and the pager share (None without the pager)."""
    try:
        from hypervisor.kvpager.cost import RestoreCost
    except ImportError:
        return None
    return RestoreCost()


class ModelHost:
    """Backend + embedder + KV store + service; a context manager that closes them in order."""

    def __init__(self, config: ModelHostConfig = ModelHostConfig()) -> None:
        self.config = config
        self.backend: Backend | None = None
        self.batcher: EmbedBatcher | None = None
        self.unavailable: list[str] = []
        try:
            if config.backend == "llama.cpp":
                self.backend = LlamaCppBackend(config.llama)
            elif config.backend == "vllm":
                self.backend = VllmBackend(VllmConfig(model=config.vllm_model, base_url=config.vllm_url))
            elif config.backend != "none":
                raise InvalidRequest(f"unknown model backend {config.backend!r}", hint="use llama.cpp, vllm or none")
        except BackendUnavailable as exc:
            self.unavailable.append(str(exc))
            log.warning("model service: %s", exc)
        if config.embeddings:
            try:
                self.batcher = EmbedBatcher(MiniLMEmbedder(threads=config.embed_threads), config.embed_window_ms)
            except BackendUnavailable as exc:
                self.unavailable.append(str(exc))
                log.warning("model service: %s", exc)
        self.pager = None
        self.cost = _restore_cost()
        self.store = self._store()
        self.service = ModelService(self.backend, self.batcher, ServiceConfig(
            quota=config.quota, guest_quotas=config.guest_quotas, snapshot_path=config.snapshot_path),
            store=self.store, cost=self.cost)

    def _store(self) -> StateStore:
        """The KV pager (relevance policy over RAM and NVMe) where present, else the ParkingStore."""
        cfg = self.config
        try:
            from hypervisor.inference.pager_store import PagerStore
            from hypervisor.kvpager.pager import KVPager
            from hypervisor.kvpager.tiers import MemoryTier, NvmeTier
        except ImportError:
            return ParkingStore(cfg.kv_ram_mib << 20, cfg.kv_nvme_dir, cfg.kv_nvme_mib << 20, cost=self.cost)
        tiers = [MemoryTier("ram", cfg.kv_ram_mib << 20)]
        if cfg.kv_nvme_dir is not None:
            tiers.append(NvmeTier("nvme", cfg.kv_nvme_mib << 20, cfg.kv_nvme_dir))
        self.pager = KVPager.relevance(tiers, cost=self.cost)
        self.pager.start()
        return PagerStore(self.pager, [t.name for t in tiers])

    def __enter__(self) -> ModelHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.service.close()
        if self.pager is not None:
            self.pager.close()
        if self.batcher is not None:
            self.batcher.close()
        if self.backend is not None:
            self.backend.close()
