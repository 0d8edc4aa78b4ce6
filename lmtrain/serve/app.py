"""The routes of `lmtrain serve`, OpenAI-compatible: /v1/models, /v1/completions, /v1/chat/completions,
/v1/classify, /health and /metrics. Streaming is server-sent events, as OpenAI's API does it.

Every route but /health needs `Authorization: Bearer KEY` when keys are configured. Errors have OpenAI's
shape ({"error": {"message", "type", "code"}}): 400 for a request the model cannot serve (with the
numbers), 401 for a key, 404 for another model's name, 422 for a body that does not parse, 429 with
Retry-After when the queue is full, 503 while the server drains.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lmtrain.data.chat_render import ChatTemplateRenderer, TemplateLimitError
from lmtrain.generate import _Tokenizer
from lmtrain.model.transformer import ModelDef
from lmtrain.serve.auth import KeyCheck
from lmtrain.serve.engine import Classifier, Engine, Job, QueueFull, Row, TokenEvent
from lmtrain.serve.metrics import Metrics
from lmtrain.serve.schemas import MAX_STOPS, ChatRequest, ClassifyRequest, CompletionRequest

log = logging.getLogger("lmtrain.serve")
RETRY_AFTER_SECONDS = 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


@dataclasses.dataclass
class ServedModel:
    """What the routes need of the model: its name, tokenizer, head and the defaults a request starts from."""

    name: str
    model_def: ModelDef
    tokenizer: _Tokenizer
    pad_id: int
    end_ids: frozenset[int]  # EOS and the chat template's end of turn: a row ends there unless ignore_eos
    chat_template: str | None
    labels: list[str] | None  # a classifier's class names
    max_tokens_cap: int  # the most tokens one request may ask for

    @property
    def max_seq_len(self) -> int:
        return self.model_def.cfg.max_seq_len


@dataclasses.dataclass
class Settings:
    max_n: int  # rows one request may ask for (n times prompts); at most the engine's batch


class RowText:
    """A row's text as its tokens come: stop strings cut it, and text that may be the start of a stop string
    (or half a UTF-8 character) is held back until it is known not to be."""

    def __init__(self, tokenizer: _Tokenizer, stops: list[str], ends: frozenset[int]):
        self.tokenizer, self.stops, self.ends = tokenizer, stops, ends
        self.tokens: list[int] = []
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []
        self.sent = 0
        self.text = ""
        self.finish: str | None = None
        self.generated = 0

    def add(self, event: TokenEvent) -> tuple[str, bool]:
        """(new text to send, whether a stop string ended the row)."""
        self.generated += 1
        if event.token in self.ends:
            return "", False
        self.tokens.append(event.token)
        self.logprobs.append((event.token, event.logprob, event.top))
        self.text = self.tokenizer.decode(self.tokens)
        cuts = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.text = self.text[: min(cuts)]
            return self.flush(), True
        hold = max((len(s) - 1 for s in self.stops), default=0)
        safe = len(self.text) - hold
        if self.text.endswith("\ufffd"):
            safe = min(safe, len(self.text) - 1)
        if safe <= self.sent:
            return "", False
        delta, self.sent = self.text[self.sent:safe], safe
        return delta, False

    def flush(self) -> str:
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta


def create_app(model: ServedModel, engine: Engine | None, classifier: Classifier | None, keys: KeyCheck,
               metrics: Metrics, settings: Settings) -> FastAPI:
    app = FastAPI(title="lmtrain serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.draining = False
    app.state.ready = False
    renderer = (ChatTemplateRenderer(model.chat_template, "chat template", model.tokenizer.special_tokens)
                if model.chat_template else None)

    def authorized(request: Request) -> None:
        if not keys.allows(request.headers.get("authorization")):
            raise ApiError(401, "a valid API key is needed: send the header 'Authorization: Bearer KEY'.",
                           "authentication_error", {"WWW-Authenticate": "Bearer"})
        if app.state.draining:
            raise ApiError(503, "the server is shutting down; send the request elsewhere.", "server_shutting_down")

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError):
        return _error(e.status, e.message, e.kind, e.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_request: Request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}"
                             for err in e.errors()[:5])
        return _error(422, f"the request body does not fit the API: {problems}", "invalid_request_error")

    @app.get("/health")
    async def health():
        if not app.state.ready:
            return JSONResponse({"status": "warming up"}, status_code=503)
        return {"status": "draining" if app.state.draining else "ok"}

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def prometheus():
        if engine is not None:
            metrics.queue_depth.set(engine.queue_depth)
            metrics.running.set(engine.running_rows)
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": model.name, "object": "model", "created": 0, "owned_by": "lmtrain",
                                            "max_model_len": model.max_seq_len}]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body.model, model)
        prompts = _completion_prompts(body.prompt, model)
        return await _serve(request, body, prompts, "completion", echo_texts=prompts if body.echo else None)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(body: ChatRequest, request: Request):
        _check_model(body.model, model)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        text = _render_chat(model, renderer, [m.model_dump() for m in body.messages])
        return await _serve(request, body, [(text, model.tokenizer.encode(text, add_special_tokens=False))], "chat")

    @app.post("/v1/classify", dependencies=[Depends(authorized)])
    async def classify(body: ClassifyRequest):
        _check_model(body.model, model)
        if classifier is None:
            raise ApiError(400, f"{model.name} is a language model; /v1/classify serves classifier WORKDIRs. Use "
                           "/v1/completions.")
        texts = [body.input] if isinstance(body.input, str) else body.input
        ids = [model.tokenizer.encode(t) or [model.pad_id] for t in texts]
        probs = await asyncio.get_running_loop().run_in_executor(None, classifier.probabilities, ids)
        labels = model.labels or [f"LABEL_{i}" for i in range(probs.shape[1])]
        data = [{"index": i, "label": labels[int(np.argmax(p))],
                 "probs": {label: float(x) for label, x in zip(labels, p, strict=True)}} for i, p in enumerate(probs)]
        return {"object": "list", "model": model.name, "data": data}

    async def _serve(request: Request, body, prompts: list[tuple[str, list[int]]], kind: str,
                     echo_texts: list | None = None):
        if engine is None:
            raise ApiError(400, f"{model.name} is a classifier; it answers /v1/classify, not text generation.")
        rows_asked = len(prompts) * body.n
        if rows_asked > settings.max_n:
            raise ApiError(400, f"n={body.n} times {len(prompts)} prompt(s) asks for {rows_asked} generations; this "
                           f"server runs at most {settings.max_n} per request.")
        stops = body.stop_list()
        if len(stops) > MAX_STOPS:
            raise ApiError(400, f"stop has {len(stops)} strings; give at most {MAX_STOPS}.")
        max_tokens = _max_tokens(body, prompts, model)
        ends = frozenset() if body.ignore_eos else model.end_ids
        single = frozenset(t for s in stops if (t := model.tokenizer.token_id(s)) is not None)
        seed = body.seed if body.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4]) >> 1
        rows = [Row(ids, max_tokens, body.temperature, body.top_p, body.top_k, (seed + k) % (1 << 31), ends | single)
                for ids in (p[1] for p in prompts) for k in range(body.n)]
        texts = [RowText(model.tokenizer, stops, ends | single) for _ in rows]
        stream = _Stream(rows, texts, metrics)
        job = Job(rows, stream.emit_threadsafe(asyncio.get_running_loop()))
        try:
            engine.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}); retry in {RETRY_AFTER_SECONDS}s.", "rate_limit_exceeded",
                           {"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        metrics.prompt_tokens.inc(sum(len(row.prompt) for row in rows))
        top_n = body.top_logprobs() if kind == "completion" else body.top_logprobs_count()
        meta = {"id": f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()), "model": model.name}
        prompt_tokens = sum(len(p[1]) for p in prompts) * body.n
        echoes = [echo_texts[i // body.n][0] for i in range(len(rows))] if echo_texts else None
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            chunks = _stream_chunks(stream, job, kind, meta, model, top_n, prompt_tokens if usage else None, echoes)
            return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _complete(request, stream, job, kind, meta, model, top_n, prompt_tokens, echoes)

    return app


class _Stream:
    """Carries a job's engine events to the request's task, timing the first token, each token and the end."""

    def __init__(self, rows: list[Row], texts: list[RowText], metrics: Metrics):
        self.texts, self.metrics = texts, metrics
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.open_rows = len(rows)
        self.start = time.perf_counter()
        self.last: float | None = None

    def emit_threadsafe(self, loop: asyncio.AbstractEventLoop):
        return lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def events(self, job: Job):
        """(row, new text, event) until every row finished; a row that meets a stop string is cancelled."""
        while self.open_rows:
            event = await self.queue.get()
            row = self.texts[event.row]
            if event.token is None:
                if row.finish is None:
                    row.finish = "stop" if event.finish == "cancelled" else event.finish
                    self.open_rows -= 1
                    yield event.row, row.flush(), event
                continue
            if row.finish is not None:
                continue
            self._time_token()
            delta, stopped = row.add(event)
            if stopped:
                row.finish = "stop"
                job.cancel(event.row)
                self.open_rows -= 1
            yield event.row, delta, event
        self.metrics.e2e.observe(time.perf_counter() - self.start)

    def _time_token(self) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            self.metrics.per_token.observe(now - self.last)
        self.last = now


async def _complete(request, stream: _Stream, job: Job, kind, meta, model, top_n, prompt_tokens, echoes):
    watcher = asyncio.create_task(_cancel_when_gone(request, job))
    try:
        async for _ in stream.events(job):
            pass
    finally:
        watcher.cancel()
        job.cancel()
    choices = []
    for i, row in enumerate(stream.texts):
        text = (echoes[i] if echoes else "") + row.text
        if kind == "completion":
            choices.append({"index": i, "text": text, "finish_reason": row.finish,
                            "logprobs": _completion_logprobs(model, row.logprobs, top_n)})
        else:
            choices.append({"index": i, "message": {"role": "assistant", "content": row.text},
                            "finish_reason": row.finish, "logprobs": _chat_logprobs(model, row.logprobs, top_n)})
    generated = sum(row.generated for row in stream.texts)
    return {**meta, "object": "text_completion" if kind == "completion" else "chat.completion", "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                      "total_tokens": prompt_tokens + generated}}


async def _cancel_when_gone(request: Request, job: Job) -> None:
    """A client that hangs up on a non-streaming request frees its rows too."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
    job.cancel()


async def _stream_chunks(stream: _Stream, job: Job, kind, meta, model, top_n, prompt_tokens, echoes):
    """Server-sent events as OpenAI sends them; the client hanging up (the generator closed) frees the rows."""
    obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
    try:
        if kind == "chat":
            for i in range(len(stream.texts)):
                yield _sse({**meta, "object": obj, "choices": [{"index": i, "delta": {"role": "assistant",
                                                                                   "content": ""},
                                                                 "finish_reason": None}]})
        elif echoes:
            for i, echo in enumerate(echoes):
                yield _sse({**meta, "object": obj, "choices": [{"index": i, "text": echo, "finish_reason": None,
                                                                 "logprobs": None}]})
        async for i, delta, event in stream.events(job):
            finish = stream.texts[i].finish
            if not delta and finish is None and top_n is None:
                continue
            lp = [(event.token, event.logprob, event.top)] if top_n is not None and event.token is not None else []
            if kind == "completion":
                choice = {"index": i, "text": delta, "finish_reason": finish,
                          "logprobs": _completion_logprobs(model, lp, top_n) if lp else None}
            else:
                choice = {"index": i, "delta": {"content": delta} if delta else {}, "finish_reason": finish,
                          "logprobs": _chat_logprobs(model, lp, top_n) if lp else None}
            yield _sse({**meta, "object": obj, "choices": [choice]})
        if prompt_tokens is not None:
            generated = sum(row.generated for row in stream.texts)
            yield _sse({**meta, "object": obj, "choices": [], "usage": {
                "prompt_tokens": prompt_tokens, "completion_tokens": generated,
                "total_tokens": prompt_tokens + generated}})
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _completion_logprobs(model: ServedModel, picked, top_n):
    if top_n is None:
        return None
    tokens = [model.tokenizer.decode([t]) for t, _, _ in picked]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in picked],
            "top_logprobs": [{model.tokenizer.decode([t]): lp for t, lp in top[:top_n]} for _, _, top in picked],
            "text_offset": offsets}


def _chat_logprobs(model: ServedModel, picked, top_n):
    if top_n is None:
        return None

    def entry(token, lp):
        text = model.tokenizer.decode([token])
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(x, y) for x, y in top[:top_n]]} for t, lp, top in picked]}


def _error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                        headers=headers)


def _check_model(name: str, model: ServedModel) -> None:
    if name != model.name:
        raise ApiError(404, f"model '{name}' is not served here; this server serves '{model.name}'.", "not_found")


def _completion_prompts(prompt, model: ServedModel) -> list[tuple[str, list[int]]]:
    """(text, ids) per prompt: a string, a list of strings, or a list of token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if all(isinstance(p, int) for p in prompt):
        vocab = model.model_def.cfg.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ApiError(400, f"prompt token ids must lie in [0, {vocab}) (the model's vocabulary).")
        return [(model.tokenizer.decode(list(prompt)), list(prompt))]
    out = []
    for text in prompt:
        ids = model.tokenizer.encode(text)
        out.append((text, ids or [model.tokenizer.eos_id if model.tokenizer.eos_id is not None else model.pad_id]))
    return out


def _max_tokens(body, prompts, model: ServedModel) -> int:
    """The request's max_tokens (or all the room the context leaves, up to the cap), checked against both."""
    longest = max(len(p[1]) for p in prompts)
    room = model.max_seq_len - longest
    if room < 1:
        raise ApiError(400, f"the prompt has {longest} tokens; the model's context is {model.max_seq_len} tokens, "
                       "which leaves no room to generate. Shorten the prompt.")
    if body.max_tokens is None:
        return min(room, model.max_tokens_cap)
    if body.max_tokens > model.max_tokens_cap:
        raise ApiError(400, f"max_tokens={body.max_tokens} is over this server's cap of {model.max_tokens_cap} "
                       "tokens per request (lmtrain serve --max-tokens-cap).")
    if longest + body.max_tokens > model.max_seq_len:
        raise ApiError(400, f"the prompt ({longest} tokens) plus max_tokens={body.max_tokens} is "
                       f"{longest + body.max_tokens} tokens, over the model's context of {model.max_seq_len} "
                       "tokens. Shorten the prompt or ask for fewer tokens.")
    return body.max_tokens


def _render_chat(model: ServedModel, renderer, messages: list[dict]) -> str:
    if renderer is None:
        raise ApiError(400, f"{model.name} has no chat template (neither its training data nor its tokenizer has "
                       "one); use /v1/completions.")
    try:
        return renderer(messages, add_generation_prompt=True)
    except (TemplateLimitError, Exception) as e:  # noqa: BLE001 - a template's own raise_exception, a bad message
        raise ApiError(400, f"the chat template cannot render these messages: {str(e).splitlines()[0]}") from None
