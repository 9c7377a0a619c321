"""Text in and out on either end: the artifact's tokenizer, without transformers. Streamed decoding is the
tokenizers library's own ``DecodeStream``, which holds back a character split across tokens."""

from __future__ import annotations

from tokenizers import Tokenizer

from seam.runtime.artifact import Artifact


def load_tokenizer(artifact: Artifact) -> Tokenizer:
    return Tokenizer.from_file(str(artifact.tokenizer_path))
