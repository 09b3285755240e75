"""HTTP routes of the OpenAI-compatible API. Each handler validates, submits to the service, and
shapes the answer; the decoding itself happens on the service's engine thread."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from zipmoe.errors import ZipMoEError
from zipmoe.generation import SamplingParams, encode_chat, encode_prompt
from zipmoe.serve import protocol as p
from zipmoe.serve.service import DISCONNECT_POLL_S, Delta, Done, Failed, GenerationService, collect

router = APIRouter()


class APIError(Exception):
    """An OpenAI-style error answer: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.detail = p.ErrorDetail(message=message, type=type, param=param, code=code)

    def response(self) -> JSONResponse:
        return JSONResponse(p.ErrorResponse(error=self.detail).model_dump(), status_code=self.status)


def _service(request: Request) -> GenerationService:
    return request.app.state.service


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    svc = _service(request)
    return {"status": "ok", "model": svc.handle.model_id, **svc.status()}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_service(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return p.model_list(_service(request).handle.model_id, request.app.state.created)


def _params(svc: GenerationService, body: p.ChatCompletionRequest | p.CompletionRequest,
            prompt_ids: list[int], prompt_param: str) -> SamplingParams:
    """Check the request against the model (name, context) and turn it into sampling parameters."""
    handle = svc.handle
    if body.model != handle.model_id:
        raise APIError(404, f"The model '{body.model}' does not exist; this server serves "
                       f"'{handle.model_id}' (see /v1/models)", "model", "model_not_found")
    ctx = handle.context_length
    if not prompt_ids:
        raise APIError(400, "the prompt is empty: give at least one token of text", prompt_param)
    if len(prompt_ids) >= ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens; the prompt has "
                       f"{len(prompt_ids)}. Shorten the prompt.", prompt_param, "context_length_exceeded")
    limit = body.token_limit()
    if limit is not None and limit > ctx:
        raise APIError(400, f"max_tokens is {limit}, but this model's context is {ctx} tokens; "
                       "ask for fewer tokens", "max_tokens", "context_length_exceeded")
    return SamplingParams(max_tokens=limit or ctx - len(prompt_ids), temperature=body.temperature,
                          top_p=body.top_p, seed=body.seed, stop=body.stop_list())


@router.post("/v1/chat/completions")
async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
    svc = _service(request)
    try:
        ids = encode_chat(svc.handle, [{"role": m.role, "content": m.text()} for m in body.messages])
    except ZipMoEError as exc:
        raise APIError(400, str(exc), "messages") from exc
    params = _params(svc, body, ids, "messages")
    rid, model = p.new_id("chatcmpl"), body.model
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(ev: Delta | Done | None) -> list[dict]:
            if ev is None:
                return [p.chat_chunk(rid, model, {"role": "assistant", "content": ""})]
            if isinstance(ev, Delta):
                return [p.chat_chunk(rid, model, {"content": ev.text})]
            out = [p.chat_chunk(rid, model, {}, ev.result.finish_reason)]
            return out + ([p.usage_chunk(rid, model, _usage(ev.result), chat=True)] if include_usage else [])

        return _sse(svc, _submit(svc, ids, params), request, chunk)
    result = await _wait(svc, ids, params, request)
    return JSONResponse(p.chat_response(rid, model, result.text, result.finish_reason, _usage(result)))


@router.post("/v1/completions")
async def completions(body: p.CompletionRequest, request: Request) -> Response:
    svc = _service(request)
    ids = _completion_ids(svc, body)
    params = _params(svc, body, ids, "prompt")
    rid, model = p.new_id("cmpl"), body.model
    prefix = body.prompt if body.echo and isinstance(body.prompt, str) else ""
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(ev: Delta | Done | None) -> list[dict]:
            if ev is None:
                return [p.completion_response(rid, model, prefix, None, chunk=True)] if prefix else []
            if isinstance(ev, Delta):
                return [p.completion_response(rid, model, ev.text, None, chunk=True)]
            out = [p.completion_response(rid, model, "", ev.result.finish_reason, chunk=True)]
            return out + ([p.usage_chunk(rid, model, _usage(ev.result), chat=False)] if include_usage else [])

        return _sse(svc, _submit(svc, ids, params), request, chunk)
    result = await _wait(svc, ids, params, request)
    return JSONResponse(p.completion_response(rid, model, prefix + result.text, result.finish_reason,
                                              _usage(result)))


def _completion_ids(svc: GenerationService, body: p.CompletionRequest) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(x, str) for x in prompt):
        if len(prompt) != 1:
            raise APIError(400, "only one prompt per request is supported; send one request each", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return encode_prompt(svc.handle, prompt)
    vocab = len(svc.handle.tokenizer)
    if not prompt or any(not 0 <= t < vocab for t in prompt):
        raise APIError(400, f"token-id prompts must be non-empty ids in [0, {vocab})", "prompt")
    return list(prompt)


def _usage(result) -> p.Usage:
    return p.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                   total_tokens=result.prompt_tokens + result.completion_tokens)


async def _wait(svc: GenerationService, ids: list[int], params: SamplingParams, request: Request):
    req = _submit(svc, ids, params)
    try:
        result = await collect(req, request.is_disconnected)
        if result is None:  # nobody is listening any more; the slot is freed below
            raise APIError(499, "client closed the request", code="client_closed")
        return result
    except ZipMoEError as exc:
        raise APIError(500, str(exc), type="server_error") from exc
    finally:
        svc.cancel(req)  # no-op when finished; frees the slot if the client disconnected


def _submit(svc: GenerationService, ids: list[int], params: SamplingParams):
    try:
        return svc.submit(ids, params)
    except ZipMoEError as exc:
        raise APIError(503, str(exc), type="server_error", code="server_busy") from exc


def _sse(svc: GenerationService, req, request: Request, chunk: Callable) -> StreamingResponse:
    """Server-sent events: `data: {json}\\n\\n` per chunk, then `data: [DONE]`; a disconnect cancels."""

    async def events() -> AsyncIterator[str]:
        try:
            for c in chunk(None):
                yield f"data: {json.dumps(c)}\n\n"
            next_check = time.monotonic() + DISCONNECT_POLL_S
            while True:
                try:
                    ev = await asyncio.wait_for(req.events.get(), timeout=DISCONNECT_POLL_S)
                except TimeoutError:
                    ev = None
                if time.monotonic() >= next_check:
                    if await request.is_disconnected():
                        return
                    next_check = time.monotonic() + DISCONNECT_POLL_S
                if ev is None:
                    continue
                if isinstance(ev, Failed):
                    err = p.ErrorDetail(message=ev.message, type="server_error")
                    yield f"data: {json.dumps({'error': err.model_dump()})}\n\n"
                    break
                for c in chunk(ev):
                    yield f"data: {json.dumps(c)}\n\n"
                if isinstance(ev, Done):
                    break
            yield "data: [DONE]\n\n"
        finally:
            svc.cancel(req)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
