"""An OpenAI-compatible HTTP API over one chat.Session (Starlette app, served by uvicorn).

Routes: POST /v1/chat/completions, POST /v1/completions (both streaming by server-sent events or
not), GET /v1/models, GET /health, GET /metrics (Prometheus text format).

A model opened with one KV cache slot computes one request at a time; with several
(`--parallel-requests`), up to that many requests are decoded together in a continuous batch
(engine/batch.py), each on its own slot, the rest wait in arrival order. A streaming client that
disconnects cancels its generation (checked between tokens and while its tokens wait to be
computed), which frees its slot; a waiting request whose client has gone is skipped. Errors use OpenAI's body:
{"error": {"message", "type", "param", "code"}}.

Nobody can monopolise or crash it (`ServeLimits`):
- admission is counted here, not in the Engine, so it holds however the engine schedules: at most
  `max_queue` requests wait beyond those generating (429 + Retry-After; 503 while shutting down),
  and a request leaves the count the moment its client goes or its `request_timeout` passes;
- a prompt that cannot fit the context is refused before it is tokenized whole: every token
  covers at most the longest vocabulary piece's bytes, so a text over context x that many bytes
  cannot fit, and a long text's bounded prefix is tokenized first (`PromptBound`);
- every body field is type-checked (400), and `Front`, the outermost ASGI layer, checks the API
  key and turns anything unexpected into a logged 500 in OpenAI's shape, never a traceback.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from .chat import ChatHistory, GenerationConfig, Result, Session
from .engine.batch import Batch, Cancelled, Scheduler, SlotModel
from .engine.model import Model as EngineModel
from .metrics import Registry

log = logging.getLogger(__name__)

try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as e:                         # pragma: no cover - depends on the extra
    raise ImportError("the API server needs the api extra: pip install 'dairllm[api]'") from e


MAX_BODY = 4 << 20            # bytes of JSON one request may send (default; --max-body)


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


def logprobs_request(body: dict, chat: bool) -> int | None:
    """How many top alternatives per token to report, or None for no logprobs: chat sends
    `logprobs: true` + `top_logprobs: k`, completions `logprobs: k`."""
    if not chat:
        k = _number(body, "logprobs", None, 0, 20, int)
        return k
    on = body.get("logprobs")
    if on is not None and not isinstance(on, bool):
        raise APIError(400, "'logprobs' must be a boolean", "logprobs")
    k = _number(body, "top_logprobs", None, 0, 20, int)
    if k is not None and not on:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (k or 0) if on else None


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
    if s is None:
        return False
    if not isinstance(s, bool):
        raise APIError(400, "'stream' must be a boolean", "stream")
    return s


def include_usage(body: dict) -> bool:
    """stream_options.include_usage: the final usage chunk of a stream."""
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    usage = opts.get("include_usage", False)
    if usage is not None and not isinstance(usage, bool):
        raise APIError(400, "'stream_options.include_usage' must be a boolean",
                       "stream_options.include_usage")
    return bool(usage)


def response_model(body: dict, default: str) -> str:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "'model' must be a string", "model")
    return model or default


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


@dataclass
class Slot:
    """One parallel request's place: a Session on one KV cache slot, and that slot's last chat
    turn (a client that sends the conversation back with one more message reuses the cache
    through the reply, even where re-encoding the reply's text would give other ids)."""

    session: Session
    history: ChatHistory = field(default_factory=ChatHistory)
    busy: bool = False
    last_used: float = 0.0

    def running(self, cancel: threading.Event):
        """Context of one generation: a batch slot joins the running batch while in it."""
        model = self.session.model
        if isinstance(model, SlotModel):
            model.cancel = cancel
            return model
        return contextlib.nullcontext()


class Engine:
    """Runs Jobs: one at a time on a plain model, or up to one per KV cache slot together in a
    continuous batch (engine/batch.py) when the model was opened with several slots
    (`--parallel-requests`), or one per lane of a pipeline cluster (cluster/lanes.py), each on
    its own thread. Requests beyond that wait in arrival order."""

    def __init__(self, session: Session, model_name: str) -> None:
        self.session = session
        self.model_name = model_name
        self.scheduler: "Scheduler | None" = None
        self.slots = self._make_slots(session)
        self.pool = ThreadPoolExecutor(max_workers=len(self.slots),
                                       thread_name_prefix="dairllm-gen")
        self.lock = threading.Lock()
        self.queued = 0
        self.finished: deque = deque(maxlen=64)      # recent Results (for /health and tests)
        self.running: dict = {}                      # id -> Job being generated

    def _make_slots(self, session: Session) -> list:
        model = session.model
        lanes = getattr(model, "lanes", ())
        if len(lanes) > 1:                       # a pipeline cluster: one lane per request
            log.info("pipeline lanes: %d parallel requests", len(lanes))
            return [Slot(session)] + [Slot(Session(lane, session.tok, session.template))
                                      for lane in lanes[1:]]
        n = getattr(getattr(model, "state", None), "slots", 1)
        if n == 1 or not isinstance(model, EngineModel):
            return [Slot(session)]
        self.scheduler = Scheduler(Batch(model)).start()
        log.info("continuous batching: %d parallel requests", n)
        return [Slot(Session(self.scheduler.slot(i), session.tok, session.template))
                for i in range(n)]

    @property
    def parallel(self) -> int:
        return len(self.slots)

    def submit(self, job: Job):
        with self.lock:
            self.queued += 1
        return self.pool.submit(self._run, job)

    def _take_slot(self, chat_text: "str | None") -> Slot:
        """A free slot (one exists: as many workers as slots): the one whose last chat turn this
        request continues, else the least recently used."""
        with self.lock:
            self.queued -= 1
            free = [s for s in self.slots if not s.busy]

            def continues(s: Slot) -> int:
                h = s.history
                if chat_text is None:
                    return 0
                return max((len(t) for t in (h.text, h.prompt_text)
                            if t and chat_text.startswith(t)), default=0)

            slot = max(free, key=lambda s: (continues(s), -s.last_used))
            slot.busy = True
            return slot

    def _run(self, job: Job) -> None:
        slot = self._take_slot(job.chat_text)
        try:
            if job.cancel.is_set():
                job.emit("error", APIError(499, "client went away", code="cancelled"))
                return
            self.running[id(job)] = job
            self._generate(slot, job)
        finally:
            self.running.pop(id(job), None)
            slot.last_used = time.monotonic()
            slot.busy = False

    def _generate(self, slot: Slot, job: Job) -> None:
        res = Result()
        session = slot.session
        try:
            if job.chat_text is not None:
                prompt = session.extend_prompt(job.chat_text, slot.history)
                slot.history = ChatHistory()
            else:
                prompt = job.build_prompt(session)
            if len(prompt) >= session.model.seq_len:
                raise APIError(400, f"the prompt has {len(prompt)} tokens; this model's context "
                               f"holds {session.model.seq_len}", "messages",
                               "context_length_exceeded")
            job.emit("prompt", len(prompt))
            try:
                with slot.running(job.cancel):
                    for piece in session.generate(prompt, job.cfg, cancel=job.cancel, result=res):
                        job.emit("text", piece)
            except Cancelled:                    # the client left while its tokens were computed
                res.finish_reason = "cancelled"
            self.finished.append(res)
            complete = res.stopped_by == "eos" or res.finish_reason == "length"
            if job.chat_text is not None and complete:
                slot.history = ChatHistory(job.chat_text, tuple(prompt), job.chat_text + res.text,
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

    def close(self) -> None:
        """Drop queued requests and stop the running ones at their next token."""
        for job in list(self.running.values()):
            job.cancel.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.scheduler is not None:
            self.scheduler.close()


# ---------------------------------------------------------------------------------------------
# Limits: what one client may ask of the server

@dataclass
class ServeLimits:
    # every endpoint wants "Authorization: Bearer <api_key>"; kept out of repr (and so logs)
    api_key: str | None = dataclasses.field(default=None, repr=False)
    max_queue: int = 16              # requests waiting beyond those generating; more get 429
    request_timeout: float = 600.0   # seconds from arrival to the last token
    max_body: int = MAX_BODY         # bytes of JSON one request may send

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if not self.request_timeout > 0:
            raise ValueError("request_timeout must be > 0 seconds")
        if self.max_body < 1024:
            raise ValueError("max_body must be at least 1024 bytes")
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key is empty")


def longest_piece_bytes(tok) -> int:
    """Bytes of the longest vocabulary entry: no token covers more of a text than that (at
    least 4: a character no token spells may become one unknown token)."""
    return max(4, max((len(tok.piece(i)) for i in range(tok.vocab_size)), default=0))


class PromptBound:
    """Refuses prompts that cannot fit the context without tokenizing them whole."""

    PROBE_CHARS_PER_TOKEN = 8      # a prefix this many chars per context token is tokenized first
    PROBE_SLACK = 16               # tokens a cut at the prefix's end may add

    def __init__(self, session: Session) -> None:
        self.session = session
        self.seq_len = session.model.seq_len
        self.max_bytes = self.seq_len * longest_piece_bytes(session.tok)

    def _too_long(self, what: str, param: str) -> APIError:
        return APIError(400, f"{what}; this model's context holds {self.seq_len} tokens",
                        param, "context_length_exceeded")

    def check_size(self, text: str, param: str) -> None:
        """Cheap, on the event loop: the byte bound."""
        if len(text) > self.max_bytes or len(text.encode("utf-8", "replace")) > self.max_bytes:
            raise self._too_long(f"the prompt is over {self.max_bytes} bytes", param)

    def check_prefix(self, text: str, param: str) -> None:
        """Tokenizes a bounded prefix of a long text (in a thread): enough tokens there already
        mean the whole cannot fit."""
        probe = self.seq_len * self.PROBE_CHARS_PER_TOKEN
        if len(text) <= probe:
            return
        n = len(self.session.encode(text[:probe], add_bos=False))
        if n > self.seq_len + self.PROBE_SLACK:
            raise self._too_long(f"the prompt has more than {n - self.PROBE_SLACK} tokens", param)

    async def check(self, text: str, param: str, pool: ThreadPoolExecutor) -> None:
        """Both checks; the prefix one in `pool` (one thread: probes run one at a time)."""
        self.check_size(text, param)
        await asyncio.get_running_loop().run_in_executor(pool, self.check_prefix, text, param)


# ---------------------------------------------------------------------------------------------
# Metrics and admission: counted by the app, whatever the engine does inside

class ServerMetrics:
    """The /metrics series; `waiting` and `running` are also the admission counts."""

    def __init__(self, model=None) -> None:
        self.waiting = 0                 # admitted, not yet generating
        self.running = 0                 # generating (prompt accepted, not finished)
        r = self.registry = Registry()
        self.requests = r.counter("dairllm_http_requests_total",
                                  "HTTP requests answered, by endpoint and status")
        self.outcomes = r.counter("dairllm_generations_total",
                                  "Admitted generation requests by outcome")
        self.prompt_tokens = r.counter("dairllm_prompt_tokens_total",
                                       "Prompt tokens computed (cached ones excluded)")
        self.cached_tokens = r.counter("dairllm_prompt_cached_tokens_total",
                                       "Prompt tokens whose K/V cache entries were reused")
        self.generated_tokens = r.counter("dairllm_generated_tokens_total", "Tokens generated")
        self.prompt_seconds = r.counter("dairllm_prompt_seconds_total",
                                        "Seconds spent computing prompts")
        self.decode_seconds = r.counter("dairllm_decode_seconds_total",
                                        "Seconds spent generating tokens")
        r.gauge("dairllm_queue_depth", "Requests waiting for the engine", lambda: self.waiting)
        r.gauge("dairllm_running_requests", "Requests generating (the running batch size)",
                lambda: self.running)
        self.ttft = r.histogram("dairllm_time_to_first_token_seconds",
                                "Seconds from arrival to the first generated text")
        self.latency = r.histogram("dairllm_request_duration_seconds",
                                   "Seconds from arrival to the end of a generation request")
        if getattr(model, "net_stats", None) is not None:
            r.gauge("dairllm_stage_seconds_total", "Seconds per cluster stage, network "
                    "included", lambda: _stage_seconds(model), type_="counter")

    def record_result(self, res: Result) -> None:
        self.prompt_tokens.inc(res.prompt_tokens - res.cached_tokens)
        self.cached_tokens.inc(res.cached_tokens)
        self.generated_tokens.inc(res.completion_tokens)
        self.prompt_seconds.inc(res.prompt_seconds)
        self.decode_seconds.inc(res.decode_seconds)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one mean request."""
        mean = self.latency.sum / self.latency.count if self.latency.count else 1.0
        return int(min(60, max(1, math.ceil(mean))))


def _stage_seconds(model) -> dict:
    """{(("stage", name),): seconds} of a cluster model, summed over its pipeline lanes (a
    generating thread may be adding a stage)."""
    out: dict = {}
    for lane in getattr(model, "lanes", None) or [model]:
        times = getattr(lane.net_stats, "stage_seconds", None) or {}
        for _ in range(3):
            try:
                items = list(times.items())
                break
            except RuntimeError:                 # changed size while copied: try again
                items = []
        for k, v in items:
            key = (("stage", str(k)),)
            out[key] = out.get(key, 0.0) + float(v)
    return out


class Ticket:
    """One admitted request's place: waiting, then running, then released exactly once."""

    def __init__(self, metrics: ServerMetrics, deadline_s: float) -> None:
        self.metrics = metrics
        self.arrived = time.monotonic()
        self.deadline = self.arrived + deadline_s
        self.state = "waiting"
        self.first_token_at: float | None = None
        metrics.waiting += 1

    def start(self) -> None:
        if self.state == "waiting":
            self.state = "running"
            self.metrics.waiting -= 1
            self.metrics.running += 1

    def first_text(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
            self.metrics.ttft.observe(self.first_token_at - self.arrived)

    def release(self, outcome: str, res: Result | None = None) -> None:
        if self.state == "released":
            return
        if self.state == "waiting":
            self.metrics.waiting -= 1
        else:
            self.metrics.running -= 1
        self.state = "released"
        self.metrics.outcomes.inc(outcome=outcome)
        if res is not None:
            self.metrics.record_result(res)
            self.metrics.latency.observe(time.monotonic() - self.arrived)


# ---------------------------------------------------------------------------------------------
# The outermost layer: API key, request counts, last resort

KNOWN_PATHS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")


def _key_digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class Front:
    """The ASGI app uvicorn runs, around the Starlette app: refuses requests without the API key
    (compared as SHA-256 digests in constant time, so neither content nor length leaks), counts
    answers by status, and turns an exception that escaped everything else into a logged 500 in
    OpenAI's shape."""

    def __init__(self, app, api_key: str | None, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics
        self._want = None if api_key is None else _key_digest(b"Bearer " + api_key.encode())

    @property
    def state(self):
        return self.app.state

    def _authorized(self, scope) -> bool:
        if self._want is None:
            return True
        got = [v for k, v in scope.get("headers", ()) if k == b"authorization"]
        given = got[0] if len(got) == 1 else b""
        return hmac.compare_digest(_key_digest(given), self._want)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        status: list = [None]

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if not self._authorized(scope):
                await _send_error(counted_send, 401, "a valid API key is required: send "
                                  "'Authorization: Bearer <key>'", code="invalid_api_key",
                                  headers=[(b"www-authenticate", b"Bearer")])
                return
            await self.app(scope, receive, counted_send)
        except ClientDisconnect:
            status[0] = status[0] or 499
        except Exception:                        # the last resort: log it, never show it
            log.exception("unhandled error on %s %s", scope.get("method"), path)
            if status[0] is None:
                await _send_error(counted_send, 500, "internal server error",
                                  type_="server_error")
        finally:
            self.metrics.requests.inc(endpoint=path if path in KNOWN_PATHS else "other",
                                      status=str(status[0] or 500))


async def _send_error(send, status: int, message: str, code: str | None = None,
                      type_: str = "invalid_request_error", headers=()) -> None:
    body = json.dumps({"error": {"message": message, "type": type_, "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})
# ---------------------------------------------------------------------------------------------
# The app

def create_app(session: Session, model_name: str = "dairllm", default_max_tokens: int = 256,
               max_body: int | None = None, limits: ServeLimits | None = None) -> Front:
    limits = limits or ServeLimits()
    if max_body is not None:
        limits = dataclasses.replace(limits, max_body=max_body)
    engine = Engine(session, model_name)
    metrics = ServerMetrics(session.model)
    bound = PromptBound(session)
    probes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dairllm-probe")
    closing = threading.Event()

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_body:
            raise APIError(413, f"the request body exceeds {limits.max_body} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body:
                raise APIError(413, f"the request body exceeds {limits.max_body} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply") from None
        except ValueError as e:          # bad JSON, bad UTF-8, integers over the digit limit
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def admit() -> Ticket:
        if closing.is_set():
            raise APIError(503, "the server is shutting down", code="shutting_down",
                           type_="server_error")
        if metrics.waiting >= limits.max_queue:
            raise APIError(429, f"the server is busy ({metrics.waiting} requests waiting); "
                           "retry later", code="queue_full", type_="rate_limit_error")
        return Ticket(metrics, limits.request_timeout)

    async def health(request: Request):
        return JSONResponse({"status": "shutting_down" if closing.is_set() else "ok",
                             "model": model_name, "queued": metrics.waiting,
                             "running": metrics.running},
                            status_code=503 if closing.is_set() else 200)

    async def metrics_text(request: Request):
        return Response(metrics.registry.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": 0, "owned_by": "dairllm"}]})

    async def admitted_run(request: Request, prompt_text: str, param: str, build_prompt,
                           cfg: GenerationConfig, stream: bool, shape: "Shape",
                           chat_text: str | None = None):
        """Admission first, so the queue limit also bounds the prompt checks' work."""
        ticket = admit()
        try:
            await bound.check(prompt_text, param, probes)
        except APIError as e:
            ticket.release(e.code or "error")
            raise
        return await run(request, ticket, build_prompt, cfg, stream, shape, chat_text)

    async def run(request: Request, ticket: Ticket, build_prompt, cfg: GenerationConfig,
                  stream: bool, shape: "Shape", chat_text: str | None = None):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(kind: str, value) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:                 # the event loop is gone (shutting down)
                cancel.set()

        streaming = False
        try:
            engine.submit(Job(build_prompt, cfg, cancel, emit, chat_text))
            # Wait for the prompt to be accepted (or refused) before answering, so a bad prompt
            # still gets a plain 4xx even when streaming; watch for the client leaving meanwhile.
            kind, value = await _next_event(queue, request, ticket)
            if kind == "error":
                ticket.release(value.code or "error")
                return value.response()
            ticket.start()
            if stream:
                streaming = True
                return _Stream(_sse(queue, request, ticket, shape),
                               on_close=lambda: _end(ticket, cancel, "cancelled"),
                               media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
            pieces = []
            while True:
                kind, value = await _next_event(queue, request, ticket)
                if kind == "text":
                    ticket.first_text()
                    pieces.append(value)
                elif kind == "error":
                    ticket.release(value.code or "error")
                    return value.response()
                elif kind == "done":
                    ticket.first_text()
                    ticket.release("done", value)
                    return JSONResponse(shape.full("".join(pieces), value))
        finally:
            if not streaming:
                _end(ticket, cancel, "cancelled")

    async def chat_completions(request: Request):
        body = await read_json(request)
        msgs = chat_messages(body)
        cfg = generation_config(body, default_max_tokens, session.model.seq_len)
        stream = _check_stream(body)
        cfg.logprobs = logprobs_request(body, chat=True)
        shape = Shape("chat.completion", response_model(body, model_name),
                      include_usage=include_usage(body),
                      piece=None if cfg.logprobs is None else session.tok.piece)
        if session.template is None:
            raise APIError(400, "this server has no chat template; use /v1/completions")
        for i, m in enumerate(msgs):                # before rendering a huge message
            bound.check_size(m["content"], f"messages[{i}].content")
        try:
            text = session.template.render(msgs)     # template errors -> 400 before queueing
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        return await admitted_run(request, text, "messages", None, cfg, stream, shape,
                                  chat_text=text)

    async def completions(request: Request):
        body = await read_json(request)
        prompt = completion_prompt(body)
        cfg = generation_config(body, 16, session.model.seq_len)
        stream = _check_stream(body)
        cfg.logprobs = logprobs_request(body, chat=False)
        shape = Shape("text_completion", response_model(body, model_name),
                      include_usage=include_usage(body),
                      piece=None if cfg.logprobs is None else session.tok.piece)
        return await admitted_run(request, prompt, "prompt",
                                  lambda s: s.encode(prompt, add_bos=True), cfg, stream, shape)

    async def api_error(request: Request, exc: APIError):
        response = exc.response()
        if exc.status in (429, 503):
            response.headers["Retry-After"] = str(metrics.retry_after())
        return response

    async def http_error(request: Request, exc: HTTPException):
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                              code="not_found" if exc.status_code == 404 else None)

    async def server_error(request: Request, exc: Exception):
        # Front logs it; the client sees no traceback
        return error_response(500, "internal server error", type_="server_error")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        closing.set()
        engine.close()
        probes.shutdown(wait=False, cancel_futures=True)

    app = Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ], exception_handlers={APIError: api_error, HTTPException: http_error,
                           Exception: server_error}, lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.limits = limits
    app.state.closing = closing
    return Front(app, limits.api_key, metrics)


def _end(ticket: Ticket, cancel: threading.Event, outcome: str) -> None:
    """The request is over for the client: stop its generation, free its place."""
    cancel.set()
    ticket.release(outcome)


class _Stream(StreamingResponse):
    """A streaming response that frees its request's place however it ends, even when the
    client left before the body iterator ever started."""

    def __init__(self, content, on_close: Callable[[], None], **kw) -> None:
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


POLL_SECONDS = 0.25          # how often a waiting request looks for its client having gone


async def _next_event(queue: asyncio.Queue, request: Request, ticket: Ticket) -> tuple:
    """The worker's next event; ("error", APIError) when the client disconnects (499) or the
    request's deadline passes (504) first."""
    while True:
        left = ticket.deadline - time.monotonic()
        if left <= 0:
            return "error", APIError(504, "the request timed out", code="timeout",
                                     type_="timeout_error")
        try:
            return await asyncio.wait_for(queue.get(), timeout=min(POLL_SECONDS, left))
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return "error", APIError(499, "client went away", code="cancelled")


@dataclass
class Shape:
    """OpenAI response objects for one request."""

    object: str                      # "chat.completion" or "text_completion"
    model: str
    include_usage: bool = False
    piece: Callable[[int], bytes] | None = None    # token id -> bytes, when logprobs were asked

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
                first: bool = False, logprobs: dict | None = None) -> dict:
        if self.object == "chat.completion":
            if delta:
                d = {"role": "assistant", "content": text or ""} if first else (
                    {"content": text} if text is not None else {})
                return {"index": 0, "delta": d, "logprobs": logprobs, "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": text},
                    "logprobs": logprobs, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}

    def logprobs(self, res: Result) -> dict | None:
        """OpenAI's logprobs object of the whole generation (None unless asked for)."""
        if self.piece is None:
            return None
        if self.object == "chat.completion":
            return chat_logprobs(res.logprobs, self.piece)
        return completion_logprobs(res.logprobs, self.piece)

    def full(self, text: str, res: Result) -> dict:
        finish = "length" if res.finish_reason == "length" else "stop"
        choice = self._choice(text, finish, delta=False, logprobs=self.logprobs(res))
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage(res), "system_fingerprint": "dairllm"}

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False,
              logprobs: dict | None = None) -> dict:
        obj = "chat.completion.chunk" if self.object == "chat.completion" else "text_completion"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
               "choices": [self._choice(text, finish, delta=True, first=first,
                                        logprobs=logprobs)],
               "system_fingerprint": "dairllm"}
        if self.include_usage:
            out["usage"] = None
        return out


def _token_entry(token: int, logprob: float, piece: Callable[[int], bytes]) -> dict:
    raw = piece(token)
    return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(entries: list, piece: Callable[[int], bytes]) -> dict:
    """Chat completions' shape: {"content": [{token, logprob, bytes, top_logprobs}], ...}."""
    return {"content": [{**_token_entry(t, lp, piece),
                         "top_logprobs": [_token_entry(i, li, piece) for i, li in top]}
                        for t, lp, top in entries], "refusal": None}


def completion_logprobs(entries: list, piece: Callable[[int], bytes]) -> dict:
    """Legacy completions' shape: parallel lists of tokens, their logprobs, top dicts, offsets."""
    tokens, offsets, at = [], [], 0
    for t, _, _ in entries:
        text = piece(t).decode("utf-8", "replace")
        tokens.append(text)
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{piece(i).decode("utf-8", "replace"): li for i, li in top}
                             for _, _, top in entries], "text_offset": offsets}


async def _sse(queue: asyncio.Queue, request: Request, ticket: Ticket, shape: Shape):
    def event(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    if shape.object == "chat.completion":
        yield event(shape.chunk("", first=True))
    while True:
        kind, value = await _next_event(queue, request, ticket)
        if kind == "text":
            ticket.first_text()
            yield event(shape.chunk(value))
        elif kind == "error":
            ticket.release(value.code or "error")
            yield event({"error": {"message": value.message, "type": value.type,
                                   "param": value.param, "code": value.code}})
            return
        elif kind == "done":
            ticket.first_text()
            ticket.release("done", value)
            finish = "length" if value.finish_reason == "length" else "stop"
            # all the logprobs come with the last chunk (pieces are not aligned to tokens)
            yield event(shape.chunk(None, finish, logprobs=shape.logprobs(value)))
            if shape.include_usage:
                yield event({"id": shape.id, "object": shape.chunk(None)["object"],
                             "created": shape.created, "model": shape.model, "choices": [],
                             "usage": shape.usage(value)})
            yield "data: [DONE]\n\n"
            return


class _NoSecrets(logging.Filter):
    """Drops the API key from any log record's text (uvicorn's and ours)."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if self.secret in text:
            record.msg, record.args = text.replace(self.secret, "***"), None
        return True


def serve(session: Session, host: str, port: int, model_name: str,
          default_max_tokens: int = 256, limits: ServeLimits | None = None) -> None:
    import uvicorn
    limits = limits or ServeLimits()
    app = create_app(session, model_name, default_max_tokens, limits=limits)
    config = uvicorn.Config(app, host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=3)      # configures uvicorn's loggers
    if limits.api_key:
        guard = _NoSecrets(limits.api_key)
        for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
            for handler in logging.getLogger(name).handlers:
                handler.addFilter(guard)
    uvicorn.Server(config).run()
