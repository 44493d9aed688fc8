"""Small tokenizers of every family prefill-kit must encode exactly, trained locally with `tokenizers`.

Each mirrors the pipeline of a real family (normalizer, pre-tokenizer, model options); the vocabularies are
tiny, which makes merges across word boundaries and byte fallback more likely, not less.
"""

from __future__ import annotations

from functools import cache

from prefill_kit.tiny_model import _corpus

CHATML = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SENTENCEPIECE = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]")
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
FAMILIES = ("gpt2", "qwen", "llama3", "metaspace-first", "metaspace-first-merging", "metaspace-always",
            "sentencepiece-legacy", "unigram")


def corpus() -> list[str]:
    return [*_corpus(), "a  b   c\t\td\n\n\ne", "▁ literal metaspace ▁▁", "[INST] hi [/INST] <s> </s>"]


def build(family: str):
    """A new `PreTrainedTokenizerFast` of `family` (one of FAMILIES), free to modify."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    byte_level = family in ("gpt2", "qwen", "llama3")
    tok = Tokenizer.from_str(_trained(family))
    if byte_level:
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@cache
def _trained(family: str) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    byte_level = family in ("gpt2", "qwen", "llama3")
    specials = list(CHATML if byte_level else SENTENCEPIECE)
    if family == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token="<unk>",
                                          show_progress=False)
    else:
        tok = Tokenizer(models.BPE(byte_fallback=not byte_level, unk_token=None if byte_level else "<unk>",
                                   ignore_merges=family == "llama3", fuse_unk=not byte_level))
        alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else []
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                      initial_alphabet=alphabet)
    if family == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif family in ("qwen", "llama3"):
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT if family == "qwen" else LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif family == "metaspace-first-merging":  # trained across spaces: tokens hold "▁" inside
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    elif family in ("metaspace-first", "metaspace-always", "sentencepiece-legacy"):
        # Trained word by word, as SentencePiece does, so no token holds "▁" after another character.
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=True)
    elif family == "unigram":
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    tok.decoder = decoders.ByteLevel() if byte_level else decoders.Metaspace()
    tok.train_from_iterator(corpus(), trainer=trainer)
    if family == "metaspace-first":  # Mistral v0.3, Llama-2 with legacy=False: each piece is one word
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    elif family == "sentencepiece-legacy":  # Llama-2 legacy: the normalizer prepends and replaces spaces
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
    return tok.to_str()


def random_texts(n: int, seed: int, specials: tuple[str, ...]) -> list[str]:
    """Text soup for the edge cases of each stage: special-token text inside content, partial special tokens,
    non-ASCII and combining marks (normalizers), whitespace runs and the metaspace character itself
    (pre-tokenizers), contractions and digit runs (split regexes), characters outside tiny vocabularies (byte
    fallback, unknown tokens)."""
    import random

    rng = random.Random(seed)
    alphabet = [*"abc XYZ 0123456789'sS\t\n\r  .,;:!?-_()<>[]/\\\"`~@#$%^&*+=|", " ", "  ", "   ", "\n\n",
                "'ll", "'VE", "\u2019", "\u00e9", "e\u0301", "\ufb01", "\u4f60\u597d", "\U0001f600", "\x1c",
                "\u00a0", "\u2028", "\u2581", "\u2581\u2581", "<think>", "</think>", "<think>\n", "<|im_",
                "[/INST", "</s", "12345", *specials]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(n)]
