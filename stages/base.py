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
from pathlib import Path

from finetune.core.config import load_config
from finetune.core.errors import exit_on_error
from finetune.embedded.files import read_corpus
from finetune.embedded.tiny_model import build_model, pack_blocks, train_tokenizer
from finetune.model.packaged import import_base
from finetune.training.resume import checkpoint_to_resume, finish_run, restore_curves, run_fingerprint
from finetune.training.runs import live_callbacks, save_atomically, trainer_args


@exit_on_error
def main(params_path: str = "params.yaml") -> None:
    from dataclasses import asdict

    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    cfg = load_config(params_path)
    if cfg.base.gguf is not None:
        import_base(
            cfg.base.gguf, cfg.paths.embedded, cfg.base.block_size, cfg.paths.base_model, cfg.paths.base_metrics
        )
        return
    texts, paragraphs = read_corpus(Path(cfg.paths.embedded))
    tokenizer = train_tokenizer(texts, cfg.base.architecture.vocab_size)
    model = build_model(cfg.base.architecture, tokenizer, cfg.base.seed)
    documents = [[tokenizer.bos_token_id, *tokenizer(p)["input_ids"], tokenizer.eos_token_id] for p in paragraphs]
    blocks = pack_blocks(documents, cfg.base.block_size)
    print(f"base: {model.num_parameters():,} parameters, {len(blocks)} blocks of {cfg.base.block_size} tokens")

    output_dir = str(Path(cfg.paths.checkpoints) / "base")
    args = trainer_args(TrainingArguments, "base", cfg.base.trainer, output_dir)
    fingerprint = run_fingerprint({"base": asdict(cfg.base)}, [cfg.paths.embedded], "base")
    resume_from = checkpoint_to_resume(output_dir, fingerprint)
    restore_curves(resume_from, cfg.paths.base_metrics)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": blocks}),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=live_callbacks(cfg.paths.base_metrics, resume=resume_from is not None),
    )
    trainer.train(resume_from_checkpoint=resume_from)

    def save(folder: str) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    save_atomically(save, cfg.paths.base_model)
    finish_run(output_dir)


if __name__ == "__main__":
    main(*sys.argv[1:])  # optional: another params file
