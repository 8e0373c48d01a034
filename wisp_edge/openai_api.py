"""`wisp-edge serve`: an OpenAI-compatible HTTP API on the edge, in the manner of llama.cpp's llama-server.

Endpoints: ``/v1/chat/completions`` and ``/v1/completions`` (streamed as
server-sent events or whole), ``/v1/models``, ``/health`` and ``/metrics``.
Each request is one Speculate session, drafted here and verified by the
server, so its text is exactly the target's.

Concurrency: an `EdgeClient` holds a drafter with per-generation state, so the
daemon keeps a fixed pool of ``max_concurrent_requests`` clients, each with its
own drafter over the one loaded copy of the draft weights. A request takes a
free client for its whole generation: the one whose last context its prompt
continues (a conversation's next turn, whose drafter state is reused), else
the least recently used one, so other conversations keep theirs. The
generation runs in a thread of its own. When none is free the request is
refused with 429 and ``Retry-After`` at once, rather than queued behind
others on a device that has no spare compute.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

import grpc
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from wisp_common import systemd
from wisp_common.config import EdgeConfig
from wisp_common.request import RETRY_AFTER_KEY, SamplingParams, Slo
from wisp_edge.chat import conversation_ids
from wisp_edge.client import Cancellation, EdgeClient, GenerationResult, GenerationStats
from wisp_edge.detokenize import IncrementalText
from wisp_edge.drafter import shared_prefix
from wisp_edge.metrics import EdgeMetrics, RequestRecord, SpecDecodeStats

RETRY_AFTER_SECONDS = 1  # when the edge is full; a full server's own hint is passed on, rounded up to seconds
GRACEFUL_SHUTDOWN_SECONDS = 5  # then open streams are cancelled, which closes their server sessions


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, kind: str, code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code
        self.headers = {} if retry_after is None else {"Retry-After": str(retry_after)}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _from_rpc(error: grpc.RpcError) -> ApiError:
    """The HTTP answer for a refusal by the verification server."""
    code, details = error.code(), error.details()
    hint = dict(getattr(error, "trailing_metadata", lambda: None)() or ()).get(RETRY_AFTER_KEY)
    retry_after = max(RETRY_AFTER_SECONDS, math.ceil(int(hint) / 1000)) if hint else RETRY_AFTER_SECONDS
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ApiError(429, f"verification server is full: {details}", "rate_limit_error", retry_after=retry_after)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ApiError(400, details, "invalid_request_error")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        message = f"verification server unavailable: {details}"
        return ApiError(503, message, "server_error", retry_after=retry_after)
    return ApiError(500, f"verification server said {code.name}: {details}", "server_error")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """The request fields both endpoints share; unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's; llama-server and vLLM take it too
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_completion_tokens: int | None = Field(None, ge=1)  # the chat API's newer name for max_tokens


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content if part.type == "text")
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


@dataclass(frozen=True)
class Job:
    """One request as the edge runs it, whichever endpoint it came through."""

    endpoint: Literal["chat", "completions"]
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    arrived: float  # time.monotonic() at arrival, for the time to first token


@dataclass(frozen=True)
class Finished:
    """How a generation ended: the last thing a `Generation` yields."""

    finish_reason: str  # stop or length; cancelled (the HTTP client left) or error where it did not finish
    completion_tokens: int
    spec_decode: SpecDecodeStats


class ClientPool:
    """The fixed set of clients; thread safe, since a client comes back from its generation's thread."""

    def __init__(self, clients: Sequence[EdgeClient]):
        self.size = len(clients)
        self._free = list(clients)  # least recently used first
        self._prompt_lengths = {id(client): 0 for client in clients}  # of each client's last request
        self._lock = threading.Lock()

    def take(self, prompt_ids: Sequence[int]) -> EdgeClient | None:
        """A free client: the one whose last request ``prompt_ids`` continues (its whole prompt: the conversation's
        next turn, or the same prompt again), else the least recently used."""
        with self._lock:
            if not self._free:
                return None
            best = max(self._free, key=lambda client: shared_prefix(client.drafter.tokens, prompt_ids))
            if shared_prefix(best.drafter.tokens, prompt_ids) < self._prompt_lengths[id(best)]:
                best = self._free[0]  # another conversation, if one with the same system prompt
            self._free.remove(best)
            self._prompt_lengths[id(best)] = len(prompt_ids)
            return best

    def give_back(self, client: EdgeClient) -> None:
        with self._lock:
            self._free.append(client)

    @property
    def busy(self) -> int:
        with self._lock:
            return self.size - len(self._free)


class Generation:
    """One request's session, run on a pool client in a thread of its own; its events come into the event loop.

    Iterate `pieces` for the text; then `finished` says how it ended. Leaving the iteration early (the HTTP
    client went away) cancels the session, so the server frees it at once; so does a stop string.
    """

    def __init__(self, app: EdgeApp, client: EdgeClient, job: Job):
        self.app, self.job = app, job
        self.stats = GenerationStats()
        self.cancellation = Cancellation()
        self.text = IncrementalText(app.tokenizer, job.stop)
        self.tokens = 0
        self.first_at: float | None = None
        self.last_at = 0.0
        self._events: asyncio.Queue = asyncio.Queue()
        self._first: object | None = None
        self.finished: Finished | None = None
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._run, args=(client, loop), daemon=True, name="wisp-edge-request").start()

    def _run(self, client: EdgeClient, loop: asyncio.AbstractEventLoop) -> None:
        job, config = self.job, self.app.config
        client.drafter.sampling = job.sampling  # drafts follow the request's sampling; any drafts stay lossless
        try:
            outcome: object = client.generate(
                job.prompt_ids,
                max_new_tokens=job.max_tokens,
                draft_tokens=config.draft_tokens,
                sampling=job.sampling,
                slo=Slo(config.ttft_slo, config.tpot_slo),
                on_tokens=lambda tokens: loop.call_soon_threadsafe(self._events.put_nowait, tokens),
                cancellation=self.cancellation,
                stats=self.stats,
            )
        except Exception as error:  # handed to the event loop, which answers it
            outcome = error
        self.app.pool.give_back(client)  # before the last event: a client that got its answer may ask again
        loop.call_soon_threadsafe(self._events.put_nowait, outcome)

    async def started(self) -> None:
        """Waits for the first verdict, so that a refusal by the server is still answered with its own status."""
        self._first = await self._events.get()
        if isinstance(self._first, Exception):
            self._end("error")
            raise _from_rpc(self._first) if isinstance(self._first, grpc.RpcError) else self._first

    async def pieces(self) -> AsyncIterator[str]:
        try:
            while True:
                event = self._first if self._first is not None else await self._events.get()
                self._first = None
                if isinstance(event, list):
                    if piece := self._commit(event):
                        yield piece
                    if self.text.stopped:
                        self.cancellation.cancel()  # the rest is cut anyway: free the server's session now
                elif isinstance(event, GenerationResult) or self.text.stopped:
                    reason = "stop" if self.text.stopped else event.finish_reason
                    if tail := self.text.flush():
                        yield tail
                    self._end(reason)
                    return
                else:
                    self._end("error")
                    raise _from_rpc(event) if isinstance(event, grpc.RpcError) else event
        finally:
            self.close()

    def close(self) -> None:
        """Ends the session if it still runs (the HTTP client left before the end); after the end, nothing."""
        if self.finished is None:
            self.cancellation.cancel()
            self._end("cancelled")

    def _commit(self, tokens: list[int]) -> str:
        if self.text.stopped:
            return ""
        self.last_at = time.monotonic()
        if self.first_at is None:
            self.first_at = self.last_at
        self.tokens += len(tokens)
        return self.text.add(tokens)

    def _end(self, outcome: str) -> None:
        """Records how the request ended, once, in `finished` and in the metrics."""
        self.finished = Finished(outcome, self.tokens, SpecDecodeStats.of(self.stats))
        job = self.job
        ttft = None if self.first_at is None else self.first_at - job.arrived
        tpot = None
        if self.first_at is not None and self.tokens > 1:
            tpot = (self.last_at - self.first_at) / (self.tokens - 1)
        spec = self.finished.spec_decode
        record = RequestRecord(
            job.endpoint, outcome, len(job.prompt_ids), self.tokens, ttft, tpot, self.stats.rounds, spec
        )
        self.app.metrics.record(record)
        self.app.metrics.running.dec()


class EdgeApp:
    """The daemon's state: the client pool, the tokenizer, the config and the metrics."""

    def __init__(self, clients: Sequence[EdgeClient], tokenizer, config: EdgeConfig, model_name: str):
        self.pool = ClientPool(clients)
        self.tokenizer = tokenizer
        self.config = config
        self.model_name = model_name
        self.created = int(time.time())
        self.metrics = EdgeMetrics()

    def job(self, endpoint: Literal["chat", "completions"], body: _Sampling, prompt_ids: list[int]) -> Job:
        config = self.config
        max_tokens = body.max_tokens or body.max_completion_tokens or config.max_new_tokens
        sampling = SamplingParams(
            config.temperature if body.temperature is None else body.temperature,
            config.top_p if body.top_p is None else body.top_p,
            config.top_k if body.top_k is None else body.top_k,
            config.seed if body.seed is None else body.seed,
        )
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Job(endpoint, prompt_ids, max_tokens, sampling, stop, body.stream, include_usage, time.monotonic())

    async def start(self, job: Job) -> Generation:
        """Takes a free client and opens the session; 429 when the edge or the server is full."""
        client = self.pool.take(job.prompt_ids)
        if client is None:
            self.metrics.rejected.labels("edge_full").inc()
            raise ApiError(
                429,
                f"this edge is serving its limit of {self.pool.size} concurrent requests",
                "rate_limit_error",
                retry_after=RETRY_AFTER_SECONDS,
            )
        self.metrics.running.inc()
        generation = Generation(self, client, job)
        try:
            await generation.started()
        except ApiError as error:
            if error.status == 429:
                self.metrics.rejected.labels("server_full").inc()
            raise
        return generation

    async def answer(self, job: Job) -> Response:
        generation = await self.start(job)
        stamp = _Stamp(job.endpoint, self.model_name, self.config.draft_tokens)
        if job.stream:
            return StreamingResponse(
                self._events(generation, stamp), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        try:
            text = "".join([piece async for piece in generation.pieces()])
        finally:
            generation.close()
        finished = generation.finished
        return JSONResponse(stamp.whole(text, finished, _usage(job, finished)))

    async def _events(self, generation: Generation, stamp: _Stamp) -> AsyncIterator[str]:
        """The server-sent events of a streamed answer, in OpenAI's chunk format, ending with ``[DONE]``."""
        job = generation.job
        try:
            if job.endpoint == "chat":
                yield _sse(stamp.chunk({"role": "assistant", "content": ""}, None, job.include_usage))
            async for piece in generation.pieces():
                yield _sse(stamp.chunk(piece, None, job.include_usage))
            finished = generation.finished
            yield _sse(stamp.chunk(None, finished, job.include_usage))
            if job.include_usage:
                yield _sse({**stamp.head(), "choices": [], "usage": _usage(job, finished)})
        except ApiError as error:  # the status line has gone: the error travels as an event
            yield _sse({"error": {"message": error.message, "type": error.kind, "param": None, "code": error.code}})
        finally:
            generation.close()  # a client that left before the first piece: its session ends now too
        yield "data: [DONE]\n\n"


@dataclass(frozen=True)
class _Stamp:
    """One response's id, time and model, and its objects in OpenAI's shapes."""

    endpoint: str
    model: str
    max_drafts: int  # drafts per round at most: vLLM's num_spec_tokens
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        prefix = "chatcmpl" if self.endpoint == "chat" else "cmpl"
        object.__setattr__(self, "id", f"{prefix}-{uuid.uuid4().hex}")
        object.__setattr__(self, "created", int(time.time()))

    def head(self) -> dict:
        kind = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def chunk(self, content: str | dict | None, finished: Finished | None, include_usage: bool) -> dict:
        """A streamed chunk: text (or the chat's opening role), or the last one with its finish reason."""
        reason = finished.finish_reason if finished else None
        if self.endpoint == "chat":
            delta = content if isinstance(content, dict) else ({} if content is None else {"content": content})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": reason}
        chunk = {**self.head(), "choices": [choice]}
        if include_usage:
            chunk["usage"] = None
        if finished:
            chunk["metrics"] = self.metrics(finished)
        return chunk

    def whole(self, text: str, finished: Finished, usage: dict) -> dict:
        """A non-streamed answer."""
        if self.endpoint == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
            kind = "chat.completion"
        else:
            choice, kind = {"index": 0, "text": text, "logprobs": None}, "text_completion"
        choice["finish_reason"] = finished.finish_reason
        head = {**self.head(), "object": kind}
        return {**head, "choices": [choice], "usage": usage, "metrics": self.metrics(finished)}

    def metrics(self, finished: Finished) -> dict:
        """vLLM's per-request figures at the response's root (on the stream's last chunk with the finish reason)."""
        return {"speculative_decoding": finished.spec_decode.speculative_decoding(self.max_drafts)}


def _usage(job: Job, finished: Finished) -> dict:
    prompt, completion = len(job.prompt_ids), finished.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def create_app(clients: Sequence[EdgeClient], tokenizer, config: EdgeConfig, model_name: str) -> FastAPI:
    """The FastAPI application over ``clients`` (one per concurrent request)."""
    edge = EdgeApp(clients, tokenizer, config, model_name)
    app = FastAPI(title="WISP edge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.edge = edge

    async def authorized(request: Request) -> None:
        if not config.api_key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
            raise ApiError(401, "invalid or missing API key", "invalid_request_error", "invalid_api_key")

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in error.errors())
        return ApiError(400, problems, "invalid_request_error").response()

    @app.exception_handler(Exception)
    async def failed(_: Request, error: Exception) -> JSONResponse:
        return ApiError(500, f"{type(error).__name__}: {error}", "server_error").response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return ApiError(error.status_code, str(error.detail), kind).response()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        if not tokenizer.chat_template:
            raise ApiError(400, "the model has no chat template: use /v1/completions", "invalid_request_error")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        return await edge.answer(edge.job("chat", body, conversation_ids(tokenizer, messages)))

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest) -> Response:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "one prompt per request", "invalid_request_error")
        return await edge.answer(edge.job("completions", body, tokenizer.encode(prompts[0])))

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        model = {"id": model_name, "object": "model", "created": edge.created, "owned_by": "wisp"}
        return {"object": "list", "data": [model]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "requests_running": edge.pool.busy, "max_concurrent_requests": edge.pool.size}

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(edge.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


class _Server(uvicorn.Server):
    """uvicorn that tells systemd (`Type=notify` units) when it listens and when it stops."""

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            systemd.notify("READY=1")

    async def shutdown(self, sockets=None) -> None:
        systemd.notify("STOPPING=1")
        await super().shutdown(sockets)


def serve(clients: Sequence[EdgeClient], tokenizer, config: EdgeConfig, model_name: str) -> int:
    """Runs the API until SIGINT or SIGTERM (uvicorn's graceful shutdown)."""
    app = create_app(clients, tokenizer, config, model_name)
    server = _Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level="info",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        )
    )
    server.run()
    return 0
