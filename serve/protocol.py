"""The OpenAI chat-completions wire format: request models, error bodies, response and stream-chunk builders.

Pure (pydantic only): no Ray, no torch. Requests are validated strictly (a string where a number belongs is a
400, not a silent conversion); unknown fields are ignored, as OpenAI clients send extras.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class APIError(Exception):
    """An HTTP error with an OpenAI-style body {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        """The content as one string (text parts joined, as OpenAI's array form allows)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    @field_validator("content")
    @classmethod
    def _encodable(cls, content: str | list[TextPart]) -> str | list[TextPart]:
        """JSON allows lone surrogates (\\ud800) that no tokenizer can encode: reject them here (400)."""
        text = content if isinstance(content, str) else "".join(p.text for p in content)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"not valid Unicode text (a lone surrogate at character {e.start})") from None
        return content


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    """POST /v1/chat/completions body (the fields rayllama acts on)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI's

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def parse_chat_request(raw: bytes) -> ChatRequest:
    """Bytes of a request body -> ChatRequest, or APIError(400) naming the first bad field."""
    if not raw.strip():
        raise APIError(400, "request body is empty; send a JSON object with 'messages'", param=None)
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON ({e}); send a JSON object", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "request body is not valid JSON (nested too deeply); send a JSON object",
                       code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(obj).__name__}", code="invalid_json")
    try:
        return ChatRequest.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e) from None


def validation_error(e: ValidationError) -> APIError:
    """The first pydantic error as one line: 'messages.1.role: Input should be ... (got 'robot')'."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
    got = "" if err["type"] == "missing" else f" (got {err.get('input')!r:.60})"
    return APIError(400, f"{loc or 'body'}: {err['msg']}{got}", param=loc or None)


def _is_union_tag(part: Any) -> bool:
    """pydantic names the member of a union in `loc` ('stop', 'list[str]', 0); drop those names."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none", "TextPart")
                                      or part.startswith(("list[", "function-")))


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(req_id: str, model: str, choices: list[tuple[str, str]], prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    """A `chat.completion` object; choices are (text, finish_reason)."""
    return {
        "id": req_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": fr}
            for i, (text, fr) in enumerate(choices)
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(req_id: str, model: str, created: int, index: int | None, delta: dict[str, Any],
          finish_reason: str | None = None, usage_: dict[str, int] | None = None) -> str:
    """One server-sent event holding a `chat.completion.chunk` (index None: the usage-only chunk, no choices)."""
    body: dict[str, Any] = {"id": req_id, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [] if index is None else
                            [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if usage_ is not None:
        body["usage"] = usage_
    return f"data: {json.dumps(body)}\n\n"


DONE = "data: [DONE]\n\n"
