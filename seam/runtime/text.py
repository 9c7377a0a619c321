"""Text in and out on either end: the artifact's tokenizer (no transformers needed) and streamed decoding."""

from __future__ import annotations

from tokenizers import Tokenizer

from seam.runtime.artifact import Artifact


def load_tokenizer(artifact: Artifact) -> Tokenizer:
    return Tokenizer.from_file(str(artifact.tokenizer_path))


class StreamDecoder:
    """Turns token ids arriving one at a time into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return ""
        piece = text[len(self.emitted):]
        self.emitted = text
        return piece
