"""Pre-training of the embedded default's base model: a tiny Mistral on the embedded world's plain prose."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from finetune.core.config import Config
from finetune.embedded.files import read_corpus
from finetune.embedded.tiny_model import build_model, pack_blocks, train_tokenizer
from finetune.training.resume import checkpoint_to_resume, finish_run, restore_curves, run_fingerprint
from finetune.training.runs import live_callbacks, save_atomically, trainer_args


def pretrain_base(cfg: Config) -> None:
    """Train a BPE tokenizer on every text of paths.embedded, pre-train a MistralForCausalLM on its prose (resuming
    an interrupted run of the same settings and corpus), and save both to paths.base_model."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

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
