"""The HTTP layer: OpenAI-compatible routes over the engine, the job manager and the metrics.

Nothing here touches the model. A generation request is tokenized here (with the API's own
tokenizer instance: the engine thread decodes with another), handed to the engine with a sink that
moves the engine's events onto this event loop, and answered as one JSON body or as server-sent
events (`data: {chunk}` ... `data: [DONE]`). A client that goes away has its request cancelled,
which frees its slot in the batch.
"""
from __future__ import annotations

import asyncio
import json
import secrets
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from trainer.serving.metrics import CONTENT_TYPE_LATEST
from trainer.serving.protocol import (APIError, ChatRequest, CompletionRequest, JobCreate, chat_body, chat_chunk,
                                      completion_body, model_not_found, new_id, usage)
from trainer.serving.request import Failed, Finished, GenRequest, Token
from trainer.serving.sampling import SamplingParams

DISCONNECT_POLL_S = 0.5


def create_app(engine, registry, jobs, metrics, tokenizer, serving_cfg, max_model_len: int) -> FastAPI:
    app = FastAPI(title="peftforge", docs_url=None, redoc_url=None)

    async def authorize(request: Request) -> None:
        key = serving_cfg.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "Incorrect API key provided", type="authentication_error", code="invalid_api_key")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {err.get('msg')}"
        else:
            message = f"{'.'.join(loc) or 'body'}: {err.get('msg')}"
        return JSONResponse(APIError(400, message, param=".".join(loc) or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else None
        return JSONResponse(APIError(exc.status_code, str(exc.detail), code=kind).body(), status_code=exc.status_code)

    v1 = [Depends(authorize)]

    @app.get("/health")
    async def health():
        if not engine.accepting:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=v1)
    async def models():
        return {"object": "list", "data": registry.cards()}

    @app.get("/v1/models/{model_id:path}", dependencies=v1)
    async def model(model_id: str):
        served = registry.get(model_id)
        if served is None:
            raise model_not_found(model_id)
        return served.card()

    @app.post("/v1/completions", dependencies=v1)
    async def completions(body: CompletionRequest, request: Request):
        body.check()
        return await generate(request, body, body.prompt_ids(tokenizer), chat=False)

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat(body: ChatRequest, request: Request):
        body.check()
        return await generate(request, body, body.prompt_ids(tokenizer), chat=True)

    async def generate(http: Request, body, prompt: list[int], chat: bool):
        if registry.get(body.model) is None:
            raise model_not_found(body.model)
        room = max_model_len - len(prompt)
        if room < 1:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; this model takes at most {max_model_len} "
                           f"tokens in all", param="messages" if chat else "prompt", code="context_length_exceeded")
        max_tokens = body.max_tokens if body.max_tokens is not None else min(serving_cfg.default_max_tokens, room)
        if max_tokens > room:
            raise APIError(400, f"max_tokens={max_tokens} with a prompt of {len(prompt)} tokens exceeds the "
                           f"{max_model_len}-token context of this model (at most {room})", param="max_tokens",
                           code="context_length_exceeded")
        params = SamplingParams(max_tokens, body.temperature, body.top_p, body.seed, body.stops())
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def sink(event) -> None:  # called on the engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the loop is gone (shutdown): nobody is listening
                pass

        rid = new_id("chatcmpl" if chat else "cmpl")
        engine.submit(GenRequest(rid, body.model, prompt, params, sink))
        try:
            first = await _next(queue, http, engine, rid)
        except asyncio.CancelledError:
            engine.cancel(rid)
            raise
        if first is None:
            return Response(status_code=499)
        if isinstance(first, Failed):
            raise APIError(first.status, first.message, type="server_error" if first.status >= 500 else
                           "invalid_request_error", code=first.code)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            events = _events(first, queue, engine, rid)
            stream = _chat_sse(events, rid, body.model, len(prompt), include_usage) if chat else \
                _completion_sse(events, rid, body.model, len(prompt), include_usage)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, event = "", first
        while True:
            if isinstance(event, Token):
                text += event.text
            elif isinstance(event, Finished):
                use = usage(event.prompt_tokens, event.completion_tokens)
                if chat:
                    return chat_body(rid, body.model, text, event.reason, event.version, use)
                return completion_body(rid, body.model, text, event.reason, event.version, use)
            else:
                raise APIError(event.status, event.message, type="server_error", code=event.code)
            event = await _next(queue, http, engine, rid)
            if event is None:
                return Response(status_code=499)

    # ---- fine-tuning jobs ------------------------------------------------------------------
    @app.post("/v1/fine_tuning/jobs", dependencies=v1)
    async def create_job(body: JobCreate):
        return await asyncio.to_thread(jobs.create, body)

    @app.get("/v1/fine_tuning/jobs", dependencies=v1)
    async def list_jobs(after: str | None = None, limit: int = Query(20, ge=1, le=100)):
        return jobs.list(after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}", dependencies=v1)
    async def get_job(job_id: str):
        return jobs.get(job_id).api()

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel", dependencies=v1)
    async def cancel_job(job_id: str):
        return await asyncio.to_thread(jobs.cancel, job_id)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events", dependencies=v1)
    async def job_events(job_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=100)):
        return jobs.list_events(job_id, after, limit)

    return app


async def _next(queue: asyncio.Queue, http: Request, engine, rid: str):
    """The next engine event; None (and the request cancelled) if the client went away."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await http.is_disconnected():
                engine.cancel(rid)
                return None


async def _events(first, queue: asyncio.Queue, engine, rid: str) -> AsyncIterator:
    """The request's events up to its end; cancels the request if the stream is closed early
    (starlette cancels a streaming response whose client disconnected)."""
    finished = False
    try:
        event = first
        while True:
            yield event
            if isinstance(event, (Finished, Failed)):
                finished = True
                return
            event = await queue.get()
    finally:
        if not finished:
            engine.cancel(rid)


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def _stream_error(event: Failed) -> str:
    return _sse(APIError(event.status, event.message, type="server_error", code=event.code).body())


async def _chat_sse(events, rid, model, prompt_tokens, include_usage) -> AsyncIterator[str]:
    fingerprint, started = "", False
    async for event in events:
        if isinstance(event, Failed):
            yield _stream_error(event)
            break
        fingerprint = event.version
        if not started:
            yield _sse(chat_chunk(rid, model, fingerprint, {"role": "assistant", "content": ""}, None))
            started = True
        if isinstance(event, Token):
            if event.text:
                yield _sse(chat_chunk(rid, model, fingerprint, {"content": event.text}, None))
        else:
            yield _sse(chat_chunk(rid, model, fingerprint, {}, event.reason))
            if include_usage:
                yield _sse(chat_chunk(rid, model, fingerprint, None, None,
                                      usage(event.prompt_tokens, event.completion_tokens)))
    yield "data: [DONE]\n\n"


async def _completion_sse(events, rid, model, prompt_tokens, include_usage) -> AsyncIterator[str]:
    async for event in events:
        if isinstance(event, Failed):
            yield _stream_error(event)
            break
        if isinstance(event, Token):
            if event.text:
                yield _sse(completion_body(rid, model, event.text, None, event.version, None))
        else:
            yield _sse(completion_body(rid, model, "", event.reason, event.version, None))
            if include_usage:
                body = completion_body(rid, model, "", event.reason, event.version,
                                       usage(event.prompt_tokens, event.completion_tokens))
                body["choices"] = []
                yield _sse(body)
    yield "data: [DONE]\n\n"
