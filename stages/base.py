"""base: build the embedded default model, a tiny Mistral pre-trained on the embedded world's plain prose, or import
a pretrained one shipped inside a Python package (base.gguf; recipe smollm2).

Reads params `base` and `paths`; trains a BPE tokenizer on every text of paths.embedded, pre-trains a
MistralForCausalLM on pretrain.txt (no instructions, no [INST] format), and writes paths.base_model (safetensors +
tokenizer with the Mistral chat template) and curves under paths.base_metrics. With base.gguf it writes the imported
model (float32 safetensors, its tokenizer and chat template) instead, and its loss on the embedded prose.

    dvc repro base           # or: python -m stages.base
"""

from __future__ import annotations

import sys

from finetune.core.config import load_config
from finetune.core.errors import exit_on_error
from finetune.model.packaged import import_base
from finetune.training.pretrain import pretrain_base


@exit_on_error
def main(params_path: str = "params.yaml") -> None:
    cfg = load_config(params_path)
    if cfg.base.gguf is not None:
        import_base(
            cfg.base.gguf, cfg.paths.embedded, cfg.base.block_size, cfg.paths.base_model, cfg.paths.base_metrics
        )
        return
    pretrain_base(cfg)


if __name__ == "__main__":
    main(*sys.argv[1:])  # optional: another params file
