"""A pretrained model shipped as a GGUF file inside an installed Python package, imported as a plain transformers
folder (float32 safetensors, its own tokenizer and chat template), so it runs offline like any local model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from finetune.core.errors import ConfigError


def packaged_file(package: str, file: str) -> Path:
    """Where `file` lies inside the installed `package`, found without importing the package (its own imports, such
    as the `llm` plugin host, are not needed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(f"base.gguf.package: {package} is not installed (see README, Recipes: smollm2)")
    path = Path(spec.origin).parent / file
    if not path.is_file():
        raise ConfigError(f"base.gguf.file: {file} is not in {path.parent}")
    return path


def load_gguf(path: Path):
    """(model, tokenizer) from a GGUF file, dequantized to float32 by transformers (with the `gguf` package)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import GgufConfig as GgufLoading

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, quantization_config=GgufLoading(dequantize=True)
    )  # dequantized on load: a plain model, which save_pretrained writes as safetensors
    if tokenizer.chat_template is None:
        raise ConfigError(f"base.gguf.file: {path} carries no chat template; the pipeline's prompts need one")
    return model, tokenizer


def corpus_loss(model, tokenizer, paragraphs: list[str], block_size: int, max_blocks: int = 64) -> float:
    """The model's mean next-token loss on the first `max_blocks` blocks of the paragraphs: how well the imported
    model already writes the embedded world's prose, before any fine-tuning."""
    import torch

    from finetune.embedded.tiny_model import pack_blocks

    eos = tokenizer.eos_token_id
    documents = [[*tokenizer(p, add_special_tokens=False)["input_ids"], eos] for p in paragraphs]
    blocks = pack_blocks(documents, block_size)[:max_blocks]
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([block]), labels=torch.tensor([block])).loss.item() for block in blocks]
    return sum(losses) / len(losses)


def import_base(gguf, embedded_dir: str, block_size: int, destination: str, metrics_dir: str) -> None:
    """Stage base with base.gguf set: the packaged model written to `destination`, and its loss on the embedded
    prose logged to `metrics_dir` as the tiny model's pre-training curves are."""
    from dvclive import Live

    from finetune.embedded.files import read_corpus
    from finetune.training.runs import save_atomically

    path = packaged_file(gguf.package, gguf.file)
    model, tokenizer = load_gguf(path)
    print(f"base: {model.num_parameters():,} parameters imported from {path}")

    def save(folder: str) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    save_atomically(save, destination)
    _, paragraphs = read_corpus(Path(embedded_dir))
    loss = corpus_loss(model, tokenizer, paragraphs, block_size)
    print(f"base: loss {loss:.3f} on the embedded prose")
    with Live(metrics_dir, dvcyaml=False, save_dvc_exp=False) as live:
        live.log_param("imported_from", f"{gguf.package}/{gguf.file}")
        live.log_metric("corpus_loss", loss)
