"""An offline byte-level tokenizer for the built-in presets, sized to any vocabulary of at least 259 tokens.

Every byte is one token, so any text encodes without a trained vocabulary. Ids past the bytes and the three
special tokens are filled with pronounceable pseudo-words, so text sampled from a random-weight model decodes
to readable gibberish rather than to empty strings.
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>")
_ONSETS = "b d f g k l m n p r s t v z ch sh th br st tr".split()
_VOWELS = "a e i o u".split()


def _pseudo_words(count: int, seed: int) -> list[str]:
    syllables = [onset + vowel for onset in _ONSETS for vowel in _VOWELS]
    rng = random.Random(seed)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        word = "".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
        if word not in seen:
            seen.add(word)
            words.append("\u0120" + word)  # byte-level spelling of a leading space
    return words


def build_byte_tokenizer(vocab_size: int, seed: int = 0) -> Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    fixed = [*SPECIAL_TOKENS, *alphabet]
    if vocab_size < len(fixed):
        raise ValueError(f"a byte-level vocabulary needs at least {len(fixed)} tokens, got {vocab_size}")
    tokens = fixed + _pseudo_words(vocab_size - len(fixed), seed)
    tokenizer = Tokenizer(models.BPE(vocab={token: index for index, token in enumerate(tokens)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer
