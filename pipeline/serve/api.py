"""The HTTP API: OpenAI's chat completions (streaming and not), models and health, plus the chat page at `/`.

A request is checked and prepared (images decoded, the conversation tokenized by the model's processor) in a worker
thread, so concurrent requests prepare in parallel and only valid ones reach the engine. Every refusal is a 4xx
with OpenAI's error body, {"error": {"message", "type", "param", "code"}}, and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.serve.engine import Engine, Request

STATIC_DIR = Path(__file__).resolve().parent / "static"


@dataclass
class ServerLimits:
    max_new_tokens: int = 512  # default and ceiling of max_tokens
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 64 * 1024 * 1024  # refuses decompression bombs before decoding
    max_request_bytes: int = 32 * 1024 * 1024
    local_image_dir: Path | None = None  # image_url may name files under it (file:// or a path)


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields this server has no use for (user, seed, ...)

    model: str
    messages: list[dict] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(default=1, ge=1)


def create_app(engine: Engine, model_name: str, limits: ServerLimits) -> FastAPI:
    """The server's FastAPI app: its error handlers and routes.

    It is long because FastAPI registers routes by decorating functions, and the routes here are closures over the
    engine, the processor and the limits they share; each route is short on its own."""
    app = FastAPI(title="AnyMAL", docs_url=None, redoc_url=None)
    processor = engine.processor
    context_tokens = getattr(engine.model.config.text_config, "max_position_embeddings", None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        if first.get("type") == "json_invalid":
            return APIError(400, "the request body is not valid JSON", "invalid_json").response()
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return APIError(400, f"{where or 'body'}: {first.get('msg', 'invalid')}", "invalid_value", where).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, error: StarletteHTTPException):
        return APIError(error.status_code, str(error.detail), "http_error").response()

    @app.middleware("http")
    async def limit_body(request: HTTPRequest, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_request_bytes:
            message = f"the request body has {length} bytes; the limit is {limits.max_request_bytes}"
            return APIError(413, message, "request_too_large").response()
        return await call_next(request)

    @app.get("/")
    async def page():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/health")
    async def health():
        stats = engine.stats
        return {
            "status": "ok",
            "model": model_name,
            "batches": stats.batches,
            "requests": stats.requests,
            "largest_batch": stats.largest_batch,
        }

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "anymal", "task": processor.task}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_name:
            raise APIError(
                404, f"the model '{name}' does not exist; this server serves '{model_name}'", "model_not_found"
            )
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        if body.model != model_name:
            raise APIError(
                404,
                f"the model '{body.model}' does not exist; this server serves '{model_name}'",
                "model_not_found",
                "model",
            )
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", "unsupported_value", "n")
        request = await run_in_threadpool(prepare, body)
        request.loop, request.events = asyncio.get_running_loop(), asyncio.Queue()
        engine.submit(request)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream(request, completion_id, usage), media_type="text/event-stream")
        try:
            while True:
                event = await request.events.get()
                if event[0] == "error":
                    raise APIError(500, event[1], "generation_failed")
                if event[0] == "done":
                    break
        finally:
            request.cancelled = request.finish_reason is None
        message = {"role": "assistant", "content": request.text}
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": message, "finish_reason": request.finish_reason}],
            "usage": usage_of(request),
        }

    async def stream(request: Request, completion_id: str, include_usage: bool):
        def chunk(delta: dict, finish_reason=None, usage=None) -> str:
            payload = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}] if usage is None else [],
            }
            if usage is not None:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await request.events.get()
                if event[0] == "delta":
                    yield chunk({"content": event[1]})
                elif event[0] == "done":
                    yield chunk({}, finish_reason=event[1])
                    break
                else:
                    error = {"message": event[1], "type": "server_error", "param": None, "code": "generation_failed"}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    break
            if include_usage:
                yield chunk({}, usage=usage_of(request))
            yield "data: [DONE]\n\n"
        finally:
            # A client that went away frees its row at the next step.
            request.cancelled = request.finish_reason is None

    def prepare(body: ChatCompletionRequest) -> Request:
        conversation, image = read_messages(body.messages, limits)
        if processor.task == "caption":
            if image is None:
                raise APIError(400, "this model captions images: send one image", "image_required", "messages")
            conversation = None  # a captioning model starts from the image alone
        try:
            input_ids = processor.encode(conversation, with_image=image is not None)
        except ValueError as error:
            raise APIError(400, str(error), "invalid_messages", "messages") from None
        requested = body.max_completion_tokens or body.max_tokens
        if requested is not None and requested > limits.max_new_tokens:
            message = f"max_tokens={requested} is more than this server's limit of {limits.max_new_tokens}"
            raise APIError(400, message, "max_tokens_too_large", "max_tokens")
        max_new_tokens = requested or limits.max_new_tokens
        if context_tokens is not None:
            room = context_tokens - len(input_ids)
            if room < 1 or (requested is not None and requested > room):
                message = (
                    f"the prompt has {len(input_ids)} tokens (image included) and asks for up to "
                    f"{requested or 1} more, but the model's context is {context_tokens} tokens"
                )
                raise APIError(400, message, "context_length_exceeded", "messages")
            max_new_tokens = min(max_new_tokens, room)
        pixel_values = None
        if image is not None:
            pixel_values = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop strings", "too_many_stop_strings", "stop")
        return Request(
            input_ids=input_ids,
            pixel_values=pixel_values,
            max_new_tokens=max_new_tokens,
            temperature=0.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            stop=stops,
        )

    return app


def usage_of(request: Request) -> dict:
    return {
        "prompt_tokens": len(request.input_ids),
        "completion_tokens": len(request.tokens),
        "total_tokens": len(request.input_ids) + len(request.tokens),
    }


def read_messages(messages: list[dict], limits: ServerLimits):
    """OpenAI messages as the processor's conversation (image parts kept as markers) and the one image, if any."""
    conversation, image = [], None
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{index}].role must be system, user or assistant", "invalid_role", "messages")
        if isinstance(content, str):
            conversation.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise APIError(400, f"messages[{index}].content must be a string or a list of parts", "invalid_content")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                if image is not None:
                    raise APIError(400, "this model reads one image per conversation", "too_many_images", "messages")
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise APIError(400, f"messages[{index}]: image_url needs a url", "invalid_image_url", "messages")
                image = load_image(url, limits)
                parts.append({"type": "image"})
            else:
                raise APIError(400, f"messages[{index}]: unsupported content part {part!r:.60}", "invalid_content")
        conversation.append({"role": role, "content": parts})
    return conversation, image


def load_image(url: str, limits: ServerLimits):
    """A data URL, or a local file under the operator's allowed directory, as an RGB PIL image."""
    from PIL import Image, UnidentifiedImageError

    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise APIError(400, "image data URLs must be base64 encoded", "invalid_image_url", "messages")
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            message = f"the image has about {len(payload) * 3 // 4} bytes; the limit is {limits.max_image_bytes}"
            raise APIError(413, message, "image_too_large", "messages")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "the image data URL is not valid base64", "invalid_image", "messages") from None
    elif limits.local_image_dir is not None and not url.startswith(("http://", "https://")):
        path = Path(url.removeprefix("file://")).resolve()
        if not path.is_relative_to(limits.local_image_dir) or not path.is_file():
            message = f"local images must be files under {limits.local_image_dir}"
            raise APIError(400, message, "image_not_allowed", "messages")
        if path.stat().st_size > limits.max_image_bytes:
            raise APIError(413, f"the image is over {limits.max_image_bytes} bytes", "image_too_large", "messages")
        data = path.read_bytes()
    else:
        message = "send images as data URLs (data:image/png;base64,...); this server does not fetch URLs"
        if limits.local_image_dir is None:
            message += " or read local files"
        raise APIError(400, message, "unsupported_image_url", "messages")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if width * height > limits.max_image_pixels:
                message = f"the image has {width}x{height} pixels; the limit is {limits.max_image_pixels}"
                raise APIError(413, message, "image_too_large", "messages")
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise APIError(400, "the image_url does not hold a readable image", "invalid_image", "messages") from None
