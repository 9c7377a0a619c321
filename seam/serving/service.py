"""The HTTP endpoint's model side: the artifact and this device's blocks loaded once, the connections to the edge
(``Lanes``), and a request's prompt turned into token ids and checked against the model's context. The HTTP
handlers (``app.py``) call it; each generation runs in ``jobs.py``."""

from __future__ import annotations

import argparse
import copy
import logging
import threading
from pathlib import Path

from seam.runtime.artifact import Artifact
from seam.runtime.chat import ChatTemplate, encode_conversation
from seam.runtime.errors import SeamError
from seam.runtime.executor import SessionPool
from seam.runtime.impairments import parse as parse_impairment
from seam.runtime.ort_options import providers_for
from seam.runtime.spans import Span
from seam.runtime.text import load_tokenizer
from seam.runtime.transport import TransportTimeout
from seam.serving.events import EventHub
from seam.serving.lanes import Lanes
from seam.serving.requests import ApiError, Completion, bad
from seam.ue_client.cli import checked_split, choose_policy, open_client

log = logging.getLogger("seam.serving")
UNSTATED_CONTEXT = 2048  # positions a model whose config names no context is allowed


class Service:
    def __init__(self, args: argparse.Namespace, model_id: str, hub: EventHub):
        self.args, self.model_id, self.hub = args, model_id, hub
        self.ready = threading.Event()
        self.failure: str | None = None  # why loading failed, for /health and the command's exit
        self.warnings: list[str] = []

    def load(self) -> None:
        """Opens the artifact, loads this device's blocks and connects to the edge once, so that a wrong artifact,
        split or edge fails at startup rather than at the first request; then sets ``ready``."""
        args = self.args
        self.artifact = Artifact.open(args.artifact)
        self.split = checked_split(args, self.artifact)
        self.variant = self.artifact.check_variant(args.variant)
        if args.private_output:
            self.artifact.check_private_output()
        providers_for(args.device)
        self.tokenizer = load_tokenizer(self.artifact)
        self.eos = self.artifact.manifest.tokenizer.get("eos_token_id")
        self.chat_model = ChatTemplate.of(self.artifact) is not None
        self.context = self.artifact.context_length or UNSTATED_CONTEXT
        self.impairment = parse_impairment(args.impair) if args.impair else None
        self.policy, prior = choose_policy(args, self.artifact)  # a half-given cost model is refused now
        self.pool = SessionPool(self.artifact, args.threads, args.device)
        self.pool.preload(Span(0, self.split), self.variant)

        def connect():
            return open_client(args, self.artifact, self.variant, prior, self.pool)

        self.lanes = Lanes(connect, args.parallel)
        try:
            first = connect()
        except TransportTimeout:
            if not args.fallback_local:
                raise
            self.warnings.append(f"the edge server at {args.server} is unreachable; answering on this device until "
                                 "it is back")
        else:
            self.warnings += first.warnings
            self.lanes.keep(first)
        self.ready.set()

    def load_or_fail(self, on_failure) -> None:
        """``load`` on a thread of its own: a failure is kept for /health and ``on_failure()`` stops the server."""
        try:
            self.load()
        except SeamError as error:
            self.failure = str(error)
            on_failure()
        except Exception as error:  # a bug: the server must still stop and say why
            log.exception("loading failed")
            self.failure = f"loading failed: {error!r}"
            on_failure()

    def check_ready(self) -> None:
        if not self.ready.is_set():
            message = self.failure or "the model is still loading; retry when GET /health answers 200"
            raise ApiError(503, message, None, "loading", "server_error")

    def new_policy(self):
        """A policy of a request's own: a policy may keep state across the steps of one generation."""
        return copy.deepcopy(self.policy)

    def prompt_ids(self, completion: Completion) -> list[int]:
        """The token ids the model sees: the conversation through the model's chat template, or the prompt as
        it is."""
        if completion.chat:
            if not self.chat_model:
                raise bad("messages", "this model has no chat template (a base model); use /v1/completions")
            try:
                return encode_conversation(self.artifact, self.tokenizer, completion.messages)
            except SeamError as error:
                raise bad("messages", str(error)) from None
        if isinstance(completion.prompt, tuple):
            vocabulary = self.artifact.manifest.dims.vocab_size
            if not all(0 <= token < vocabulary for token in completion.prompt):
                raise bad("prompt", f"token ids must be from 0 to {vocabulary - 1}")
            return list(completion.prompt)
        ids = self.tokenizer.encode(completion.prompt).ids
        if not ids:
            raise bad("prompt", "encodes to no tokens; give some text")
        return ids

    def max_tokens(self, completion: Completion, prompt_length: int) -> int:
        """The answer's length limit: the request's ``max_tokens``, refused when it would pass the model's context,
        or else as much of the context as remains, at most ``--default-max-tokens``."""
        room = self.context - prompt_length
        field = "messages" if completion.chat else "prompt"
        if room < 1:
            raise ApiError(400, f"{field}: the prompt is {prompt_length} tokens and this model's context is "
                                f"{self.context}; shorten it", field, "context_length_exceeded")
        if completion.max_tokens is None:
            return min(room, self.args.default_max_tokens)
        if completion.max_tokens > room:
            raise ApiError(400, f"max_tokens: this model's context is {self.context} tokens and the prompt takes "
                                f"{prompt_length}; ask for at most {room} or shorten the prompt", "max_tokens",
                           "context_length_exceeded")
        return completion.max_tokens

    def close(self) -> None:
        if self.ready.is_set():
            self.lanes.close()


def model_id(artifact: Path) -> str:
    """The name apps give as ``model``: the artifact directory's, as the user chose it at export."""
    return Path(artifact).resolve().name
