"""Build a tiny, random, fully local model and tokenizer.

Nothing here downloads: the tokenizer is a byte-level BPE trained on a built-in corpus, the model is
a randomly initialised Qwen2 (or Llama) from a config. Tests, examples and benchmarks use it to run
the real loading, rendering and training code offline in seconds.
"""

from __future__ import annotations

import itertools
from pathlib import Path

CHATML_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _corpus() -> list[str]:
    """Short math-chat text, so common words, digits and the reasoning tags get their own tokens."""
    words = ("the answer is what how many total each apples cost dollars step first then so we get "
             "solve compute find value let number sum product half twice more less left right").split()
    lines = []
    for i, (a, b) in enumerate(itertools.product(range(0, 60, 7), range(1, 40, 3))):
        w = " ".join(words[(i + k) % len(words)] for k in range(8))
        lines.append(f"<think>\n{w} {a} + {b} = {a + b}\n</think>\n<answer>{a + b}</answer>")
        lines.append(f"Question: {w}? {a} * {b} \\boxed{{{a * b}}} The answer is {a - b}.")
    lines.append("system user assistant You are a helpful assistant. Ünïcödé café 数学 🙂")
    return lines


def build_tokenizer(*, chat_template: str, add_bos: bool = False, vocab_size: int = 400,
                    bos_token: str | None = None):
    """A `PreTrainedTokenizerFast` with ChatML special tokens and the given chat template.

    With `add_bos=True` the tokenizer prepends `bos_token` (default `<s>`) whenever
    `add_special_tokens=True`, like Llama's: the setting under which a pre-rendered prompt
    that already starts with BOS gets two.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos = bos_token or ("<s>" if add_bos else None)
    specials = list(CHATML_SPECIAL) + ([bos] if bos else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=bos,
        chat_template=chat_template, model_max_length=4096)


def make_tiny_model(out_dir: str | Path, *, chat_template: str | None = None, add_bos: bool = False,
                    arch: str = "qwen2", hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                    context: int = 2048) -> Path:
    """Write a tiny random causal LM and its tokenizer to `out_dir`; returns the directory.

    `chat_template` defaults to the shipped `chatml` template. `context` is `max_position_embeddings`: 2048 holds
    the tools example's rollout prompts (the tools' schemas are ~1,000 tokens through the tiny tokenizer).
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from prefill_kit.templates import load_template

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(chat_template=chat_template or load_template("chatml").source, add_bos=add_bos)
    config_cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=context, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
