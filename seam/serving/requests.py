"""What an app may ask of the HTTP endpoint: an OpenAI request body checked into a ``Completion``, every fault an
``ApiError`` that names the field and says what to send instead. Pure: no model, no network."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from seam.runtime.sampling import SamplingParams

MAX_STOPS = 4  # as OpenAI allows
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED = {  # fields whose meaning Seam cannot honour, refused rather than silently ignored
    "tools": "tool calls are not supported",
    "functions": "function calls are not supported",
    "logprobs": "log probabilities are not returned",
    "echo": "echoing the prompt is not supported",
    "suffix": "a suffix (insertion) is not supported",
}


class ApiError(Exception):
    """A request the endpoint answers with ``status`` and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"{param}: {message}", param, code)


@dataclass(frozen=True)
class Completion:
    """One checked request: a chat's ``messages`` or a plain ``prompt`` (text or token ids), and how to answer."""

    chat: bool
    messages: tuple[dict, ...]
    prompt: str | tuple[int, ...] | None
    max_tokens: int | None  # None: until the end of the turn or of the model's context
    sampling: SamplingParams
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool


def parse_completion(body: object, chat: bool, model_id: str) -> Completion:
    """``body`` of ``POST /v1/chat/completions`` (``chat``) or ``/v1/completions``, checked."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_body")
    model = body.get("model")
    if not isinstance(model, str):
        raise bad("model", f"give the model's name, {model_id!r} (GET /v1/models lists it)")
    if model != model_id:
        raise ApiError(400, f"model: this endpoint serves {model_id!r}, not {model[:80]!r}", "model", "model_not_found")
    for field, why in UNSUPPORTED.items():
        if body.get(field) not in (None, False, [], 0):
            raise bad(field, f"{why}; leave it out", "unsupported_parameter")
    if body.get("n", 1) != 1:
        raise bad("n", "only one choice per request is supported; send 1 or leave it out", "unsupported_parameter")
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise bad("stream_options", "an object, only with stream: true")
    return Completion(
        chat=chat,
        messages=_messages(body.get("messages")) if chat else (),
        prompt=None if chat else _prompt(body.get("prompt")),
        max_tokens=_max_tokens(body),
        sampling=_sampling(body),
        stops=_stops(body.get("stop")),
        stream=stream,
        include_usage=bool(options and _boolean(options, "include_usage", False)),
    )


def _boolean(body: dict, field: str, default: bool) -> bool:
    value = body.get(field, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(field, f"true or false, got {value!r:.40}")
    return value


def _number(body: dict, field: str, default: float, low: float, high: float, integer: bool = False):
    value = body.get(field)
    if value is None:
        return default
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise bad(field, f"{kind} from {low:g} to {high:g}, got {value!r:.40}")
    return value


def _max_tokens(body: dict) -> int | None:
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if body.get(field) is None:
        return None
    return _number(body, field, None, 1, 2**31, integer=True)


def _sampling(body: dict) -> SamplingParams:
    temperature = _number(body, "temperature", 1.0, 0, 2)  # OpenAI's default; 0 is greedy
    top_p = _number(body, "top_p", 1.0, 0, 1)
    if top_p == 0:
        raise bad("top_p", "keep some probability mass: give more than 0, at most 1")
    top_k = _number(body, "top_k", 0, 0, 2**31, integer=True)  # not OpenAI's, but llama.cpp and vLLM take it
    seed = body.get("seed")
    seed = secrets.randbelow(2**31) if seed is None else _number(body, "seed", 0, 0, 2**63 - 1, integer=True)
    return SamplingParams(float(temperature), int(top_k), float(top_p), int(seed))


def _stops(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop", f"a string or a list of at most {MAX_STOPS} non-empty strings")
    return tuple(stops)


def _messages(value: object) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise bad("messages", "a non-empty list of {role, content} objects")
    messages = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise bad(where, f"needs a role among {', '.join(ROLES)}")
        messages.append({"role": ROLES[message["role"]], "content": _content(message.get("content"), where)})
    return tuple(messages)


def _content(content: object, where: str) -> str:
    """A message's text: a string, or the text parts of a list (what newer clients send)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        if all(part.get("type") == "text" and isinstance(part.get("text"), str) for part in content):
            return "".join(part["text"] for part in content)
        raise bad(f"{where}.content", "only text parts are supported (no images or audio)", "unsupported_parameter")
    raise bad(f"{where}.content", "text, or a list of text parts")


def _prompt(value: object) -> str | tuple[int, ...]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]  # one prompt in a list, as some clients send it
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return tuple(value)
    raise bad("prompt", "a non-empty string, or a list of token ids (one prompt per request)")
