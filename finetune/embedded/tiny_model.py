"""The embedded default model: a BPE tokenizer trained on the embedded corpus and a tiny Mistral-architecture LM."""

from __future__ import annotations

from collections.abc import Iterable

from finetune.core.config import TinyModelConfig
from finetune.model.loading import MISTRAL_CHAT_TEMPLATE

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
# Whole tokens for the instruction markers, as in Mistral's newer tokenizers: a model this small learns the format
# faster when "[INST]" is one symbol rather than five.
INST, END_INST = "[INST]", "[/INST]"


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer (no unknown characters) with Mistral's special tokens, ready for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS, INST, END_INST],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=UNK,  # as load_tokenizer does for Mistral: pad must not be EOS
        additional_special_tokens=[INST, END_INST],
        chat_template=MISTRAL_CHAT_TEMPLATE,
        model_max_length=1024,
    )
    return tokenizer


def build_model(arch: TinyModelConfig, tokenizer, seed: int):
    """A randomly initialised MistralForCausalLM with the given shape, seeded."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        max_position_embeddings=arch.max_position_embeddings,
        sliding_window=None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return MistralForCausalLM(config)


def pack_blocks(token_ids: list[list[int]], block_size: int) -> list[list[int]]:
    """Documents joined end to end and cut into equal blocks: plain-text pre-training wastes nothing on padding."""
    stream = [token for document in token_ids for token in document]
    return [stream[start : start + block_size] for start in range(0, len(stream) - block_size + 1, block_size)]
