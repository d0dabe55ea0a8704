"""The OpenAI-compatible HTTP API over a Server: the one module that imports FastAPI.

    POST /v1/completions, /v1/chat/completions   (stream: true answers in server-sent events)
    GET  /v1/models, /health, /ready, /qos/status

The tenant is the one whose API key the `Authorization: Bearer KEY` header carries (keys are mapped
to tenants in the SLO file, `api_keys:`); a missing or unknown key is refused with 401 unless the
operator names an anonymous tenant. Bodies are checked by typed models (vLLM's shape): a malformed
one is a 400 whose error names the field, in OpenAI's error format. A request accepted is answered
(a client that leaves mid-stream cancels its request). `make_app` serves under Ray Serve
(runtime/ray_app.py) or any ASGI server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from catalog.slo import SLOError
from runtime.limits import QueueFull, Rejected, Stopping

log = logging.getLogger(__name__)
UNSUPPORTED = "is not supported by this server"
TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    retry = {"Retry-After": "1"} if status in (429, 503) else None  # a full queue or a stop: try again
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status,
                        headers=retry)


# --- request bodies (unknown fields are ignored, as OpenAI's clients send some we do not use) ---------
class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampled(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    user: str | None = None
    # accepted only at their no-op values
    logprobs: bool | int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None

    def check(self) -> None:
        for name, neutral in (("logprobs", (None, False, 0)), ("presence_penalty", (0.0,)),
                              ("frequency_penalty", (0.0,)), ("logit_bias", (None, {}))):
            if getattr(self, name) not in neutral:
                raise APIError(400, f"{name} {UNSUPPORTED}", param=name)

    def sampling(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed, "stop": self.stop}


class CompletionRequest(Sampled):
    prompt: str | list[str]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def text(self) -> str:
        if self.echo or self.suffix or (self.best_of or 1) > 1:
            name = "echo" if self.echo else "suffix" if self.suffix else "best_of"
            raise APIError(400, f"{name} {UNSUPPORTED}", param=name)
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise APIError(400, "prompt: one prompt per request (a list of one string, or a string)",
                               param="prompt")
            return self.prompt[0]
        return self.prompt


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def chat_prompt(tokenizer, messages: list[Message]) -> str:
    """The model's chat template when its tokenizer has one; else plain `role: text` lines."""
    turns = [{"role": m.role, "content": m.text()} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"


# --- answering ---------------------------------------------------------------------------------------
def _usage(result: dict) -> dict:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["new_tokens"],
            "total_tokens": result["prompt_tokens"] + result["new_tokens"]}


def _qos(result: dict) -> dict:
    """What moe-qos adds to an answer (clients ignore unknown fields)."""
    return {k: result[k] for k in ("tenant", "plan_id", "plan_ids", "ttft_s", "tpot_ms")}


def _awaitable(req) -> asyncio.Future:
    """The request's end as an asyncio future (resolved from the serving thread)."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def done(r):
        loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(r))
    req.add_done_callback(done)
    return fut


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (ASGI's http.disconnect, once the body is read); never
    where the server cannot tell."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # (a receive channel that fails tells nothing about the client)
        await asyncio.Event().wait()


def _pieces(server, req) -> asyncio.Queue:
    """The request's text pieces pushed into an asyncio queue by a thread of its own (the server's
    stream blocks), then None, or the error that ended it."""
    loop = asyncio.get_running_loop()
    out: asyncio.Queue = asyncio.Queue()

    def pump():
        try:
            for piece in server.pieces(req):
                loop.call_soon_threadsafe(out.put_nowait, piece)
            loop.call_soon_threadsafe(out.put_nowait, None)
        except BaseException as err:  # the request's error, handed to the client
            loop.call_soon_threadsafe(out.put_nowait, err)
    threading.Thread(target=pump, daemon=True, name=f"stream-{req.id}").start()
    return out


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def make_app(get_server: Callable, *, model_name: Callable[[], str] | str,
             anonymous_tenant: Callable[[], str | None] | str | None = None, title: str = "moe-qos") -> FastAPI:
    """The API over `get_server()` (a runtime.server.Server, or None while it starts). `model_name`:
    the name clients pass as `model`. `anonymous_tenant`: the tenant of requests without a key
    (None: refused). Both may be callables, read at each request."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)

    def name() -> str:
        return model_name() if callable(model_name) else model_name

    def anonymous() -> str | None:
        return anonymous_tenant() if callable(anonymous_tenant) else anonymous_tenant

    def server():
        s = get_server()
        if s is None:
            raise APIError(503, "the server is starting", kind="unavailable")
        return s

    def tenant_of(request: Request, srv) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if not header:
            if anonymous() is not None:
                return anonymous()
            raise APIError(401, "no API key: send 'Authorization: Bearer KEY' with a key the SLO file maps "
                           "to a tenant", kind="authentication_error")
        tenant = srv.tenant_for_key(key.strip()) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise APIError(401, "invalid API key", kind="authentication_error")
        return tenant

    def check_model(body: Sampled) -> None:
        if body.model != name():
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {name()!r}",
                           param="model")

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return _error(err.status, err.message, err.kind, err.param)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, err: RequestValidationError):
        first = err.errors()[0]
        # the field's path, without "body" and the member names pydantic adds for unions ("str", "list[str]")
        where = [str(p) for p in first.get("loc", ()) if p != "body" and not (
            isinstance(p, str) and (p in TYPE_TAGS or not p.isidentifier()))]
        param = ".".join(where) or None
        if first.get("type") == "json_invalid":
            return _error(400, "the body is not valid JSON", "invalid_request_error")
        return _error(400, f"{param or 'body'}: {first.get('msg', 'invalid')}", "invalid_request_error", param)

    def submit(srv, tenant: str, prompt: str, body: Sampled, max_tokens: int | None):
        body.check()
        try:
            return srv.submit(tenant, prompt, max_tokens or 16, **body.sampling())
        except QueueFull as err:
            raise APIError(429, str(err), kind="rate_limit_error") from None
        except Stopping as err:
            raise APIError(503, str(err), kind="unavailable") from None
        except Rejected as err:
            raise APIError(400, str(err)) from None
        except SLOError as err:  # the tenant left the SLO file since its key was checked
            raise APIError(401, str(err), kind="authentication_error") from None

    async def answer(request: Request, body: Sampled, prompt_of, chat: bool):
        srv = server()
        tenant = tenant_of(request, srv)
        check_model(body)
        prompt = prompt_of(srv)
        req = submit(srv, tenant, prompt, body, body.max_completion_tokens if chat and body.max_completion_tokens
                     else body.max_tokens)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": name()}
        if body.stream:
            return StreamingResponse(stream(srv, req, head, chat, body), media_type="text/event-stream")
        done, gone = _awaitable(req), asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the client left (Serve's proxy cancels): stop generating for it
            req.cancel()
            raise
        finally:
            gone.cancel()
        if not done.done():  # the client left (a plain ASGI server says so): stop generating for it
            req.cancel()
            raise APIError(499, "the client closed the connection; the request was cancelled", kind="cancelled")
        if (err := req.exception(0)) is not None:
            raise APIError(500, f"the request failed: {err}", kind="server_error")
        result = req.result(0)
        choice = ({"index": 0, "message": {"role": "assistant", "content": result["text"]}}
                  if chat else {"index": 0, "text": result["text"], "logprobs": None})
        choice["finish_reason"] = result["finish_reason"]
        return head | {"choices": [choice], "usage": _usage(result), "qos": _qos(result)}

    async def stream(srv, req, head: dict, chat: bool, body: Sampled):
        head = head | {"object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(text: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else {} if text is None else {"content": text})
                return head | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return head | {"choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

        pieces = _pieces(srv, req)
        try:
            if chat:
                yield _sse(chunk(None, None, first=True))
            while (piece := await pieces.get()) is not None:
                if isinstance(piece, BaseException):
                    yield _sse({"error": {"message": f"the request failed: {piece}", "type": "server_error",
                                          "param": None, "code": None}})
                    return
                yield _sse(chunk(piece, None))
            result = req.result(0)
            yield _sse(chunk(None, result["finish_reason"]))
            if body.stream_options is not None and body.stream_options.include_usage:
                yield _sse(head | {"choices": [], "usage": _usage(result), "qos": _qos(result)})
            yield "data: [DONE]\n\n"
        finally:  # the client left early (or we are done): nothing more is generated for it
            req.cancel()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await answer(request, body, lambda srv: body.text(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await answer(request, body, lambda srv: chat_prompt(srv.session.tokenizer, body.messages), chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name(), "object": "model", "created": 0, "owned_by": "moe-qos"}]}

    @app.get("/health")
    async def health():
        srv = get_server()
        if srv is None or not srv.healthy():
            return JSONResponse({"status": "unavailable"}, 503)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        # readiness, for a load balancer's probe: 503 while the first plan warms up (kernels
        # compiled, graphs captured), though requests sent meanwhile are accepted and answered after
        srv = get_server()
        if srv is None or not srv.healthy():
            return JSONResponse({"status": "unavailable"}, 503)
        if not srv.ready():
            return JSONResponse({"status": "warming"}, 503, headers={"Retry-After": "1"})
        return {"status": "ready"}

    @app.get("/qos/status")
    async def status(request: Request):
        srv = server()
        tenant_of(request, srv)  # any tenant's key (the status names no keys)
        return await asyncio.to_thread(srv.status)

    return app
