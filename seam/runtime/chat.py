"""A model's chat template, rendered on the device without transformers: the artifact keeps the template the
export copied (``chat_template.jinja``, or the ``chat_template`` of ``tokenizer_config.json``), and a sandboxed
Jinja environment renders it with the options transformers gives it, so that the prompt the model sees is the one
it was trained on."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from seam.runtime.artifact import Artifact
from seam.runtime.errors import SeamError

ROLES = ("system", "user", "assistant")


def _raise(message: str):
    raise TemplateError(message)


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # the Jinja template
    special_tokens: dict  # bos_token, eos_token, ... as the tokenizer's config names them

    @classmethod
    def of(cls, artifact: Artifact) -> ChatTemplate | None:
        """The artifact's chat template, or None when its model has none (a base model)."""
        config_path = artifact.root / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template_path = artifact.root / "chat_template.jinja"
        source = template_path.read_text() if template_path.is_file() else config.get("chat_template")
        if not isinstance(source, str) or not source.strip():
            return None
        special = {key: value for key, value in config.items() if key.endswith("_token") and isinstance(value, str)}
        return cls(source, special)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's prompt text; ``add_generation_prompt`` opens the assistant's turn."""
        for message in messages:
            if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(
                    message.get("content"), str):
                raise SeamError(f"a chat message needs a role among {', '.join(ROLES)} and text content, got "
                                f"{str(message)[:80]}")
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        environment.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            return environment.from_string(self.source).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except TemplateError as error:
            raise SeamError(f"the model's chat template refused the conversation: {error}") from None


def encode_conversation(artifact: Artifact, tokenizer, messages: Sequence[dict]) -> list[int]:
    """The token ids of a conversation through the model's chat template, the assistant's turn opened."""
    template = ChatTemplate.of(artifact)
    if template is None:
        raise SeamError("this model has no chat template (a base model); give it a plain prompt instead")
    return tokenizer.encode(template.render(messages), add_special_tokens=False).ids  # the template has them


def encode_prompt(artifact: Artifact, tokenizer, prompt: str, system: str | None = None, raw: bool = False) -> list[int]:
    """The token ids of a user's ``prompt``: as a chat turn through the model's template when it has one (after
    ``system``'s turn), or the text as it is with ``raw`` or for a model without a template."""
    if raw or ChatTemplate.of(artifact) is None:
        if system is not None:
            raise SeamError("a system prompt is part of a chat turn; drop --raw or --system" if raw else
                            "a system prompt needs a chat model; this one has no chat template")
        return tokenizer.encode(prompt).ids
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": prompt}]
    return encode_conversation(artifact, tokenizer, messages)
