"""OpenAI's completions and chat completions, as far as carpool serves them.

Requests are checked here, before any replica sees them: unknown fields are
ignored (as OpenAI's own server ignores those it does not know), but fields that
would change the output and are not supported are refused, naming the field,
rather than silently dropped. Errors are OpenAI's JSON shape.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class RequestError(Exception):
    """A request refused with an HTTP status and OpenAI's error body."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "invalid_request_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


# Fields that change what is generated and are not supported: refused when set to
# anything but their no-op value.
_UNSUPPORTED = {
    "n": 1, "best_of": 1, "logprobs": None, "top_logprobs": None, "echo": False,
    "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "suffix": None,
    "tools": None, "response_format": None,
}  # fmt: skip


class _Sampled(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # chat's newer name
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def requested_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(_Sampled):
    prompt: str

    def record(self) -> dict:
        return {"prompt": self.prompt}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer"]
    content: str


class ChatRequest(_Sampled):
    messages: list[ChatMessage] = Field(min_length=1)

    def record(self) -> dict:
        return {"messages": [{"role": m.role, "content": m.content} for m in self.messages]}


def parse_request(body: Any, kind: type[_Sampled]) -> _Sampled:
    """The request, or a 400 naming the first field that is wrong or unsupported."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    for name, no_op in _UNSUPPORTED.items():
        value = body.get(name)
        # Absent, false or empty (as clients send defaults) is the no-op too.
        if value not in (None, False, {}, []) and value != no_op:
            raise RequestError(400, f"{name}={value!r} is not supported", param=name)
    try:
        return kind.model_validate(body)
    except ValidationError as e:
        error = e.errors()[0]
        param = ".".join(str(p) for p in error["loc"])
        raise RequestError(400, f"{param}: {error['msg']}", param=param) from None


def completion_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response(chat: bool, rid: str, model: str, text: str, finish: str | None, used: dict) -> dict:
    """A whole (non-streamed) response."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}}
    else:
        choice = {"index": 0, "text": text, "logprobs": None}
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{**choice, "finish_reason": finish}],
        "usage": used,
    }


def chunk(
    chat: bool, rid: str, model: str, text: str, finish: str | None, *, first: bool = False
) -> dict:
    """One server-sent event's payload of a streamed response."""
    if chat:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        choice = {"index": 0, "delta": delta if (text or first) else {}}
    else:
        choice = {"index": 0, "text": text, "logprobs": None}
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{**choice, "finish_reason": finish}],
    }


def usage_chunk(chat: bool, rid: str, model: str, used: dict) -> dict:
    """The last event when `stream_options.include_usage` asks for it: no choices."""
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": used,
    }
