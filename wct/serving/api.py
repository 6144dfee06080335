"""The OpenAI-compatible HTTP API on FastAPI (docs/serving.md §1): routes, request checks, errors, streaming.

Every error is one JSON line in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the
status listed in docs/serving.md: 400 bad request (malformed JSON, a bad or unsupported parameter, a prompt or
max_tokens over the server's limit), 404 unknown model or route, 429 queue full and 503 draining (both with
``Retry-After``), 500 a failed generation. A bad request never reaches the model.
"""

# no ``from __future__ import annotations``: FastAPI reads the route handlers' annotations (``request: Request``) at
# run time, and FastAPI's names are imported inside create_app (the serve extra is optional)
import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from wct.errors import WCTError
from wct.serving.engine import Busy, Engine, Job

SERVE_EXTRA = "pip install 'wct[serve]' (FastAPI and uvicorn)"

# parameters accepted with any value, and those accepted only at their neutral value (anything else is refused)
SUPPORTED = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
             "seed", "stream", "user",
             "ignore_eos", "min_tokens"}  # vLLM's extensions of the OpenAI API (``extra_body`` in the openai client)
NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "echo": False,
           "best_of": 1, "suffix": ""}


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error",
                     503: "server_unavailable"}.get(status, "server_error")

    def response(self):
        from fastapi.responses import JSONResponse

        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class Limits:
    max_prompt_tokens: int = 2048
    max_tokens: int = 512  # the most a request may ask for
    default_max_tokens: int = 128  # when a request names none
    max_positions: int | None = None  # the model's context length


def _number(body: dict, key: str, low: float, high: float, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"{key}={value!r} is invalid; it must be a number in [{low:g}, {high:g}]", key)
    return float(value)


def parse_common(body: Any, limits: Limits, chat: bool) -> dict:
    """The sampling and limit settings of a completion request body (OpenAI names), checked; ApiError(400) naming
    the parameter otherwise."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for key, value in body.items():
        if key in SUPPORTED or value is None:
            continue
        if key in NEUTRAL and value == NEUTRAL[key]:
            continue
        raise ApiError(400, f"parameter {key!r} is not supported by this server (supported: "
                       f"{', '.join(sorted(SUPPORTED))}); drop it", key, "unsupported_parameter")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"{key}={max_tokens!r} is invalid; it must be an integer >= 1", key)
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"{key}={max_tokens} is over this server's limit max_tokens={limits.max_tokens}; ask for "
                       "fewer tokens", key, "max_tokens_exceeded")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop={body.get('stop')!r} is invalid; give a non-empty string or a list of up to 4",
                       "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"seed={seed!r} is invalid; it must be an integer", "seed")
    stream = body.get("stream", False) or False
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream={stream!r} is invalid; it must be true or false", "stream")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, f"ignore_eos={ignore_eos!r} is invalid; it must be true or false", "ignore_eos")
    min_tokens = 0 if body.get("min_tokens") is None else body["min_tokens"]
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or not 0 <= min_tokens <= max_tokens:
        raise ApiError(400, f"min_tokens={min_tokens!r} is invalid; it must be an integer from 0 to {key}="
                       f"{max_tokens}", "min_tokens")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required: one of the ids listed by GET /v1/models", "model")
    return {"model": model, "max_tokens": max_tokens, "stop": stop, "seed": seed, "stream": stream,
            "ignore_eos": ignore_eos, "min_tokens": min_tokens,
            "temperature": _number(body, "temperature", 0.0, 2.0, 1.0),
            "top_p": _number(body, "top_p", 1e-9, 1.0, 1.0)}


def prompt_ids(body: dict, tokenizer, chat: bool) -> list[int]:
    """Token ids of the request's prompt: the raw ``prompt`` (with the tokenizer's special tokens, as
    ``python -m wct.generate template=none``), or ``messages`` through the model's chat template."""
    if not chat:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "prompt must be one non-empty string (send one request per prompt)", "prompt")
        return tokenizer(prompt, add_special_tokens=True).input_ids
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects with string content",
                       "messages")
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template; use /v1/completions with a prompt")
    text = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def check_length(n_prompt: int, max_tokens: int, limits: Limits) -> None:
    if n_prompt > limits.max_prompt_tokens:
        raise ApiError(400, f"the prompt has {n_prompt} tokens, over this server's limit max_prompt_tokens="
                       f"{limits.max_prompt_tokens}; shorten it", "prompt", "context_length_exceeded")
    if limits.max_positions is not None and n_prompt + max_tokens > limits.max_positions:
        raise ApiError(400, f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) is over the model's context of "
                       f"{limits.max_positions} tokens; shorten the prompt or ask for fewer tokens", "max_tokens",
                       "context_length_exceeded")


def require_serve_extra() -> None:
    """WCTError naming the install command when FastAPI or uvicorn is missing (they are the ``serve`` extra)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise WCTError(f"python -m wct.serve needs {e.name}: {SERVE_EXTRA}") from None


def create_app(engine: Engine, limits: Limits, reload_folder: str | None = None):
    """The FastAPI application serving ``engine`` (routes in docs/serving.md §1)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="wct serve", docs_url=None, redoc_url=None, openapi_url=None)
    bank, tokenizer = engine.bank, engine.tokenizer
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {e.detail}; see GET /v1/models and docs/serving.md"
        return ApiError(e.status_code, message).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(e).__name__}: {e}").response()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "draining" if engine.draining else "ok", "model": bank.names[0], "deltas": bank.names[1:],
                "delta_bytes": bank.delta_bytes, "queued": engine.queued, **vars(engine.stats)}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "wct",
             **({"parent": bank.names[0]} if i else {})} for i, name in enumerate(bank.names)]}

    @app.post("/v1/deltas/reload")
    async def reload() -> dict:
        if reload_folder is None:
            raise ApiError(400, "this server was started without deltas=DIR; there is no folder to reload")
        added, refused = await asyncio.to_thread(bank.scan, reload_folder)
        return {"added": added, "refused": refused, "deltas": bank.names[1:]}

    async def read_body(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None

    async def complete(request: Request, chat: bool):
        body = await read_body(request)
        settings = parse_common(body, limits, chat)
        row = bank.index(settings["model"])
        if row is None:
            raise ApiError(404, f"model {settings['model']!r} is not served here; choose one of {bank.names}",
                           "model", "model_not_found")
        ids = prompt_ids(body, tokenizer, chat)
        check_length(len(ids), settings["max_tokens"], limits)
        job = Job(ids, row, settings["max_tokens"], settings["stop"], settings["temperature"], settings["top_p"],
                  settings["seed"], settings["ignore_eos"], settings["min_tokens"], loop=asyncio.get_running_loop(),
                  events=asyncio.Queue())
        try:
            engine.submit(job)
        except Busy as e:
            raise ApiError(e.status, str(e), headers={"Retry-After": str(e.retry_after)}) from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if settings["stream"]:
            return StreamingResponse(stream(job, rid, settings["model"], chat), media_type="text/event-stream")
        try:
            while True:
                event = await job.events.get()
                if event[0] == "error":
                    raise ApiError(500, event[1])
                if event[0] == "done":
                    break
        finally:
            job.cancelled.set()  # a no-op once done; stops the row when the handler is cancelled
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(job.tokens),
                 "total_tokens": len(ids) + len(job.tokens)}
        choice = ({"index": 0, "message": {"role": "assistant", "content": job.text}} if chat
                  else {"index": 0, "text": job.text, "logprobs": None})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": settings["model"], "choices": [{**choice, "finish_reason": job.finish_reason}],
                "usage": usage}

    async def stream(job: Job, rid: str, model: str, chat: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per piece of text, a last chunk with the finish reason, ``[DONE]``. The
        client going away stops the row (``finally``)."""
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None) -> str:
            if chat:
                choice = {"index": 0, "delta": {"role": "assistant", "content": text} if text is not None else {}}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None}
            body = {"id": rid, "object": kind, "created": int(time.time()), "model": model,
                    "choices": [{**choice, "finish_reason": finish}]}
            return f"data: {json.dumps(body)}\n\n"

        try:
            while True:
                event = await job.events.get()
                if event[0] == "text":
                    yield chunk(event[1], None)
                elif event[0] == "done":
                    yield chunk(None, event[1])
                    break
                else:
                    error = ApiError(500, event[1])
                    yield f"data: {json.dumps({'error': {'message': error.message, 'type': error.type}})}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    return app
