"""The host's embedding model on the GPU: same vectors as on the CPU, and what batching across guests buys there."""

from __future__ import annotations

import time

import numpy as np
import pytest

from hypervisor.inference.embed import MiniLMEmbedder, minilm_missing

torch = pytest.importorskip("torch")


def _texts(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    words = ("kernel page cache guest balloon vcpu memory scheduler token model file index query "
             "latency throughput network socket process syscall thermal power clock").split()
    return [" ".join(rng.choice(words, size=int(rng.integers(8, 60)))) for _ in range(n)]


@pytest.fixture(scope="module")
def embedders():
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    if minilm_missing():
        pytest.skip(minilm_missing())
    return MiniLMEmbedder(), MiniLMEmbedder(device="cpu")


def test_the_default_device_is_the_gpu_and_vectors_match_the_cpu(embedders, report):
    gpu, cpu = embedders
    assert gpu.device == "cuda"
    texts = _texts(64)
    a, b = gpu.encode(texts), cpu.encode(texts)
    assert a.shape == (64, 384)
    cos = (a * b).sum(1)
    report["embed_gpu_vs_cpu_min_cosine"] = float(cos.min())
    assert cos.min() > 0.999


def test_batched_throughput_on_gpu_vs_cpu(embedders, report):
    gpu, cpu = embedders
    texts = _texts(2048)
    gpu.encode(texts[:64])
    rows = {}
    for name, emb, n in (("gpu", gpu, 2048), ("cpu", cpu, 256)):
        for batch in (1, 32, 256):
            work = texts[:n]
            t0 = time.perf_counter()
            for i in range(0, len(work), batch):
                emb.encode(work[i:i + batch])
            rows[f"{name}_batch{batch}_texts_per_s"] = len(work) / (time.perf_counter() - t0)
    report["embed_throughput"] = rows
    assert rows["gpu_batch256_texts_per_s"] > rows["cpu_batch256_texts_per_s"]
    assert rows["gpu_batch256_texts_per_s"] > rows["gpu_batch1_texts_per_s"]
