"""The HTTP endpoint's routes (Starlette): OpenAI's ``/v1/models``, ``/v1/chat/completions`` and
``/v1/completions``, ``/health``, the chat page at ``/`` and its stream of Seam's events. Handlers check the key
and the request, start a job (``jobs.py``) and turn what it emits into a reply or a stream of Server-Sent
Events; the model work is the service's."""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from seam.serving import replies
from seam.serving.jobs import Job, run_job
from seam.serving.requests import ApiError, parse_completion
from seam.serving.service import Service

MAX_BODY_BYTES = 4 << 20  # a conversation longer than this passes any context Seam serves
DISCONNECT_CHECK_S = 0.5  # how often a non-streaming request looks whether its client has left
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may hold the stream back
PAGE = resources.files("seam.serving").joinpath("page.html").read_text(encoding="utf-8")


def build_app(service: Service, api_key: str | None, keep_alive_s: float) -> Starlette:
    started = int(time.time())

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the key "
                                "this endpoint was started with", None, "invalid_api_key")

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE)

    async def health(request: Request) -> Response:
        if service.ready.is_set():
            return JSONResponse({"status": "ok"})
        body = {"status": "error", "message": service.failure} if service.failure else {"status": "loading"}
        return JSONResponse(body, status_code=503)

    async def models(request: Request) -> Response:
        authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": service.model_id, "object": "model", "created": started, "owned_by": "seam"}]})

    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    async def complete(request: Request, chat: bool) -> Response:
        authorize(request)
        service.check_ready()
        completion = parse_completion(await _json_body(request), chat, service.model_id)
        prompt_ids = service.prompt_ids(completion)
        job, queue = _start(service, completion, prompt_ids, service.max_tokens(completion, len(prompt_ids)))
        created = int(time.time())
        if completion.stream:
            return StreamingResponse(_stream(job, queue, service.model_id, created, keep_alive_s),
                                     media_type="text/event-stream", headers=STREAM_HEADERS)
        answer = await _collect(request, job, queue)
        if answer is None:  # the client left; nobody reads this
            return Response(status_code=499)
        return JSONResponse(replies.completion(chat, job.request_id, created, service.model_id, answer),
                            headers={"X-Seam-Split": str(answer.seam.get("split"))})

    async def events(request: Request) -> Response:
        authorize(request)
        return StreamingResponse(_events(service, keep_alive_s), media_type="text/event-stream",
                                 headers=STREAM_HEADERS)

    routes = [
        Route("/", page), Route("/health", health), Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]), Route("/seam/events", events),
    ]
    return Starlette(routes=routes, exception_handlers={ApiError: _api_error, HTTPException: _http_error})


async def _json_body(request: Request) -> object:
    """The request's JSON, read no further than ``MAX_BODY_BYTES``."""
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body passes {MAX_BODY_BYTES >> 20} MiB", None, "body_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not JSON ({error}); send a JSON object", None, "invalid_json") \
            from None


def _start(service: Service, completion, prompt_ids: list[int], max_tokens: int) -> tuple[Job, asyncio.Queue]:
    """Starts the request's generation on a thread of its own; what it emits arrives on the returned queue."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def emit(item: tuple) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the server stopped while the job ran
            job.cancelled.set()

    prefix = "chatcmpl" if completion.chat else "cmpl"
    job = Job(f"{prefix}-{uuid.uuid4().hex}", completion, prompt_ids, max_tokens, emit, threading.Event())
    threading.Thread(target=run_job, args=(service, job), name=f"seam-{job.request_id}", daemon=True).start()
    return job, queue


async def _collect(request: Request, job: Job, queue: asyncio.Queue) -> replies.Answer | None:
    """The whole answer, or None when the client left first (its edge session then ends at once)."""
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(queue.get(), DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None
                continue
            if kind == "error":
                raise value
            if kind == "done":
                return value
    finally:
        job.cancelled.set()


async def _stream(job: Job, queue: asyncio.Queue, model: str, created: int, keep_alive_s: float):
    """The answer as Server-Sent Events: the role first, a chunk per piece of text, the finish reason, the usage
    when asked for, ``[DONE]``; comment lines while nothing comes (a long prefill). An error ends the stream as
    an error object. When the client leaves, the generator is closed and the job with it."""
    chat, rid = job.completion.chat, job.request_id
    try:
        if chat:
            yield replies.event(replies.chunk(chat, rid, created, model, first=True))
        while True:
            try:
                kind, value = await asyncio.wait_for(queue.get(), keep_alive_s)
            except asyncio.TimeoutError:
                yield replies.KEEP_ALIVE
                continue
            if kind == "text":
                yield replies.event(replies.chunk(chat, rid, created, model, value))
            elif kind == "error":
                yield replies.event(value.body())
                break
            else:
                yield replies.event(replies.chunk(chat, rid, created, model, finish_reason=value.finish_reason))
                if job.completion.include_usage:
                    yield replies.event(replies.usage_chunk(chat, rid, created, model, value))
                break
        yield replies.event("[DONE]")
    finally:
        job.cancelled.set()


async def _events(service: Service, keep_alive_s: float):
    listener = service.hub.listen()
    try:
        yield replies.KEEP_ALIVE  # the headers and a first line now, so the page knows it is connected
        while True:
            try:
                yield replies.event(await asyncio.wait_for(listener[1].get(), keep_alive_s))
            except asyncio.TimeoutError:
                yield replies.KEEP_ALIVE
    finally:
        service.hub.leave(listener)


async def _api_error(request: Request, error: ApiError) -> Response:
    return JSONResponse(error.body(), status_code=error.status)


async def _http_error(request: Request, error: HTTPException) -> Response:
    """Starlette's own refusals (an unknown path, a wrong method) in OpenAI's shape too."""
    message = f"{request.method} {request.url.path}: {error.detail}; see GET /v1/models and POST /v1/chat/completions"
    return JSONResponse(ApiError(error.status_code, message, None, "not_found" if error.status_code == 404 else
                                 "method_not_allowed").body(), status_code=error.status_code)
