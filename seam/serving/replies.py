"""What the HTTP endpoint answers, in OpenAI's shapes: a whole completion, the chunks of a streamed one, the
usage with Seam's own figures beside OpenAI's counts, and Server-Sent Events framing. Pure."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class Answer:
    """What a generation produced, for the reply's body and usage."""

    text: str = ""
    finish_reason: str | None = None  # "stop" (end of turn or a stop string) or "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seam: dict = field(default_factory=dict)  # the split, tokens/s, the per-token breakdown, the moves


def usage(answer: Answer) -> dict:
    """OpenAI's counts, and Seam's figures under ``seam`` (clients ignore a field they do not know)."""
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens, "seam": answer.seam}


def completion(chat: bool, request_id: str, created: int, model: str, answer: Answer) -> dict:
    """A whole ``chat.completion`` or ``text_completion`` object."""
    choice = {"index": 0, "finish_reason": answer.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": answer.text}
    else:
        choice["text"] = answer.text
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice], "usage": usage(answer)}


def chunk(chat: bool, request_id: str, created: int, model: str, text: str | None = None, first: bool = False,
          finish_reason: str | None = None) -> dict:
    """One chunk of a streamed answer: the role comes in the first, ``finish_reason`` in the last."""
    if chat:
        delta = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice]}


def usage_chunk(chat: bool, request_id: str, created: int, model: str, answer: Answer) -> dict:
    """The last chunk when the client asked for usage: empty ``choices``."""
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage(answer)}


def event(payload: dict | str) -> str:
    """One Server-Sent Event carrying ``payload`` (an object as JSON, or a string as it is, like ``[DONE]``)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


KEEP_ALIVE = ": keep-alive\n\n"  # an SSE comment: clients skip it, proxies see the connection is alive
