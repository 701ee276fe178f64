"""An OpenAI-compatible HTTP API over one chat.Session (Starlette app, served by uvicorn).

Routes: POST /v1/chat/completions, POST /v1/completions (both streaming by server-sent events or
not), GET /v1/models, GET /health.

One model computes one request at a time: requests wait in a single worker thread's queue, in
arrival order. A streaming client that disconnects cancels its generation (the worker checks
between tokens); a waiting request whose client has gone is skipped. Errors use OpenAI's body:
{"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from .chat import ChatHistory, GenerationConfig, Result, Session

log = logging.getLogger(__name__)

try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route
except ImportError as e:                         # pragma: no cover - depends on the extra
    raise ImportError("the API server needs the api extra: pip install 'dairllm[api]'") from e


MAX_BODY = 16 << 20           # bytes of JSON one request may send


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code, self.type = code, type_

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.type)


def error_response(status: int, message: str, param=None, code=None,
                   type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param,
                                   "code": code}}, status_code=status)


# ---------------------------------------------------------------------------------------------
# Request parsing

def _number(body: dict, name: str, default, lo: float, hi: float, kind=float):
    v = body.get(name, default)
    if v is None:
        return default
    bad_int = kind is int and isinstance(v, float) and not v.is_integer()
    if isinstance(v, bool) or not isinstance(v, (int, float)) or bad_int:
        raise APIError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}", name)
    if not lo <= v <= hi:
        raise APIError(400, f"'{name}' must be between {lo} and {hi}", name)
    return kind(v)


def generation_config(body: dict, default_max_tokens: int, context: int) -> GenerationConfig:
    n = body.get("n", 1)
    if n not in (1, None):
        raise APIError(400, "only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({key: max_tokens}, key, default_max_tokens, 1, context, int)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > 4
            or not all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, "'stop' must be a non-empty string or a list of up to 4", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, "'seed' must be an integer", "seed")
    return GenerationConfig(max_tokens=max_tokens,
                            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                            top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
                            seed=None if seed is None else seed & 0xFFFFFFFFFFFF, stop=stop)


def chat_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"messages[{i}].role {role!r} is not supported",
                           f"messages[{i}].role")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):          # [{"type": "text", "text": ...}, ...]
            parts = []
            for p in content:
                text_part = isinstance(p, dict) and p.get("type") == "text"
                if not text_part or not isinstance(p.get("text"), str):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported",
                                   f"messages[{i}].content")
                parts.append(p["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": role, "content": content})
    return out


def completion_prompt(body: dict) -> str:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if not isinstance(p, str) or not p:
        raise APIError(400, "'prompt' must be a non-empty string (one prompt per request)",
                       "prompt")
    if body.get("echo"):
        raise APIError(400, "'echo' is not supported", "echo")
    return p


def _check_stream(body: dict) -> bool:
    s = body.get("stream", False)
    if not isinstance(s, bool):
        raise APIError(400, "'stream' must be a boolean", "stream")
    return s


# ---------------------------------------------------------------------------------------------
# The worker: one thread owns the Session

@dataclass
class Job:
    build_prompt: Callable[[Session], list]     # runs in the worker (tokenizing can be slow)
    cfg: GenerationConfig
    cancel: threading.Event
    # emit(kind, value): ("prompt", n) ("text", s) ("done", Result) ("error", APIError)
    emit: Callable[[str, Any], None]
    chat_text: str | None = None                # the rendered chat prompt (chat requests)


class Engine:
    def __init__(self, session: Session, model_name: str) -> None:
        self.session = session
        self.model_name = model_name
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dairllm-gen")
        self.queued = 0
        self.finished: deque = deque(maxlen=64)      # recent Results (for /health and tests)
        # The last chat turn (prompt and reply as text and ids): a client that sends the
        # conversation back with one more message reuses the cache through the reply, even
        # where re-encoding the reply's text would give other ids.
        self.history = ChatHistory()
        self.current: Job | None = None

    def submit(self, job: Job):
        self.queued += 1
        return self.pool.submit(self._run, job)

    def _run(self, job: Job) -> None:
        self.queued -= 1
        if job.cancel.is_set():
            job.emit("error", APIError(499, "client went away", code="cancelled"))
            return
        res = Result()
        self.current = job
        try:
            if job.chat_text is not None:
                prompt = self.session.extend_prompt(job.chat_text, self.history)
                self.history = ChatHistory()
            else:
                prompt = job.build_prompt(self.session)
            if len(prompt) >= self.session.model.seq_len:
                raise APIError(400, f"the prompt has {len(prompt)} tokens; this model's context "
                               f"holds {self.session.model.seq_len}", "messages",
                               "context_length_exceeded")
            job.emit("prompt", len(prompt))
            for piece in self.session.generate(prompt, job.cfg, cancel=job.cancel, result=res):
                job.emit("text", piece)
            self.finished.append(res)
            complete = res.stopped_by == "eos" or res.finish_reason == "length"
            if job.chat_text is not None and complete:
                self.history = ChatHistory(job.chat_text, tuple(prompt), job.chat_text + res.text,
                                           tuple(prompt) + tuple(res.token_ids))
            log.info("request done: %d prompt tokens (%d cached), %d generated, %s",
                     res.prompt_tokens, res.cached_tokens, res.completion_tokens, res.finish_reason)
            job.emit("done", res)
        except APIError as e:
            job.emit("error", e)
        except (ValueError, TypeError) as e:
            job.emit("error", APIError(400, str(e)))
        except Exception as e:                   # keep the server alive; report a 500
            log.exception("generation failed")
            job.emit("error", APIError(500, f"{type(e).__name__}: {e}", type_="server_error"))
        finally:
            self.current = None

    def close(self) -> None:
        """Drop queued requests and stop the running one at its next token."""
        job = self.current
        if job is not None:
            job.cancel.set()
        self.pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# The app

def create_app(session: Session, model_name: str = "dairllm", default_max_tokens: int = 256,
               max_body: int = MAX_BODY):
    engine = Engine(session, model_name)

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise APIError(413, f"the request body exceeds {max_body} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise APIError(413, f"the request body exceeds {max_body} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise APIError(400, "'model' must be a string", "model")
        return body

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": model_name, "queued": engine.queued})

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": 0, "owned_by": "dairllm"}]})

    async def run(request: Request, build_prompt, cfg: GenerationConfig, stream: bool,
                  shape: "Shape", chat_text: str | None = None):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(kind: str, value) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:                 # the event loop is gone (shutting down)
                cancel.set()

        engine.submit(Job(build_prompt, cfg, cancel, emit, chat_text))
        # Wait for the prompt to be accepted (or refused) before answering, so a bad prompt
        # still gets a plain 4xx even when streaming; watch for the client leaving meanwhile.
        first = await _next_or_disconnect(queue, request, cancel)
        if first is None:
            return error_response(499, "client went away", code="cancelled")
        kind, value = first
        if kind == "error":
            return value.response()
        prompt_tokens = value
        if stream:
            return StreamingResponse(_sse(queue, cancel, shape, prompt_tokens),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        pieces = []
        while True:
            item = await _next_or_disconnect(queue, request, cancel)
            if item is None:
                return error_response(499, "client went away", code="cancelled")
            kind, value = item
            if kind == "text":
                pieces.append(value)
            elif kind == "error":
                return value.response()
            elif kind == "done":
                return JSONResponse(shape.full("".join(pieces), value))

    async def chat_completions(request: Request):
        try:
            body = await read_json(request)
            msgs = chat_messages(body)
            cfg = generation_config(body, default_max_tokens, session.model.seq_len)
            stream = _check_stream(body)
            if session.template is None:
                raise APIError(400, "this server has no chat template; use /v1/completions")
            text = session.template.render(msgs)     # template errors -> 400 before queueing
        except APIError as e:
            return e.response()
        except ValueError as e:
            return error_response(400, str(e), "messages")
        shape = Shape("chat.completion", body.get("model") or model_name,
                      include_usage=bool((body.get("stream_options") or {}).get("include_usage")))
        return await run(request, None, cfg, stream, shape, chat_text=text)

    async def completions(request: Request):
        try:
            body = await read_json(request)
            prompt = completion_prompt(body)
            cfg = generation_config(body, 16, session.model.seq_len)
            stream = _check_stream(body)
        except APIError as e:
            return e.response()
        shape = Shape("text_completion", body.get("model") or model_name,
                      include_usage=bool((body.get("stream_options") or {}).get("include_usage")))
        return await run(request, lambda s: s.encode(prompt, add_bos=True), cfg, stream, shape)

    async def not_found(request: Request, exc: HTTPException):
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                              code="not_found" if exc.status_code == 404 else None)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ], exception_handlers={HTTPException: not_found}, lifespan=lifespan)
    app.state.engine = engine
    return app


async def _next_or_disconnect(queue: asyncio.Queue, request: Request, cancel: threading.Event):
    """The worker's next event, or None (and cancel set) if the client disconnects first."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                cancel.set()
                return None


@dataclass
class Shape:
    """OpenAI response objects for one request."""

    object: str                      # "chat.completion" or "text_completion"
    model: str
    include_usage: bool = False

    def __post_init__(self) -> None:
        prefix = "chatcmpl" if self.object == "chat.completion" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    @staticmethod
    def usage(res: Result) -> dict:
        return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                "total_tokens": res.prompt_tokens + res.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": res.cached_tokens}}

    def _choice(self, text: str | None, finish: str | None, delta: bool,
                first: bool = False) -> dict:
        if self.object == "chat.completion":
            if delta:
                d = {"role": "assistant", "content": text or ""} if first else (
                    {"content": text} if text is not None else {})
                return {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": text},
                    "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def full(self, text: str, res: Result) -> dict:
        finish = "length" if res.finish_reason == "length" else "stop"
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [self._choice(text, finish, delta=False)], "usage": self.usage(res),
                "system_fingerprint": "dairllm"}

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False) -> dict:
        obj = "chat.completion.chunk" if self.object == "chat.completion" else "text_completion"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
               "choices": [self._choice(text, finish, delta=True, first=first)],
               "system_fingerprint": "dairllm"}
        if self.include_usage:
            out["usage"] = None
        return out


async def _sse(queue: asyncio.Queue, cancel: threading.Event, shape: Shape, prompt_tokens: int):
    def event(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        if shape.object == "chat.completion":
            yield event(shape.chunk("", first=True))
        while True:
            kind, value = await queue.get()
            if kind == "text":
                yield event(shape.chunk(value))
            elif kind == "error":
                yield event({"error": {"message": value.message, "type": value.type,
                                       "param": value.param, "code": value.code}})
                break
            elif kind == "done":
                finish = "length" if value.finish_reason == "length" else "stop"
                yield event(shape.chunk(None, finish))
                if shape.include_usage:
                    yield event({"id": shape.id, "object": shape.chunk(None)["object"],
                                 "created": shape.created, "model": shape.model, "choices": [],
                                 "usage": shape.usage(value)})
                yield "data: [DONE]\n\n"
                break
    finally:
        cancel.set()             # the client left (or we are done): stop generating


def serve(session: Session, host: str, port: int, model_name: str,
          default_max_tokens: int = 256) -> None:
    import uvicorn
    app = create_app(session, model_name, default_max_tokens)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=3)
