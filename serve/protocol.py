"""The OpenAI wire format (chat completions and completions): request models, error bodies, response and
stream-chunk builders.

Pure (pydantic only): no Ray, no torch. Requests are validated strictly (a string where a number belongs is a
400, not a silent conversion). A field that would change the answer but is not implemented (`tools`,
`response_format` other than text, `logit_bias`, images, ...) is a 400 naming it; other unknown fields are
ignored, as OpenAI clients send extras (`user`, `metadata`, ...).
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
                 param: str | None = None, code: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after_s = retry_after_s  # 429: the Retry-After header

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


class SamplingRequest(BaseModel):
    """The sampling fields both routes share."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI's
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def asked_tokens(self) -> int | None:
        return self.max_tokens


class ChatRequest(SamplingRequest):
    """POST /v1/chat/completions body (the fields rayllama acts on)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def asked_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    def n_top_logprobs(self) -> int:
        return self.top_logprobs or 0


class CompletionRequest(SamplingRequest):
    """POST /v1/completions body: one raw prompt (text, or token ids), no chat template."""

    prompt: str | list[int]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=20)  # the legacy form: how many top tokens per position

    def n_top_logprobs(self) -> int:
        return self.logprobs or 0


# fields that change what a client gets back; we do not implement them, so they are refused by name (a value of
# null, false, or the no-op shown here, is accepted as "not asked")
UNSUPPORTED = {
    "tools": None, "tool_choice": "none", "functions": None, "function_call": "none", "parallel_tool_calls": None,
    "response_format": {"type": "text"}, "logit_bias": None, "audio": None, "modalities": ["text"],
    "prediction": None, "web_search_options": None, "reasoning_effort": None,
    "echo": False, "suffix": None, "best_of": 1,  # /v1/completions
}


def _refuse_unsupported(obj: dict[str, Any]) -> None:
    for key, noop in UNSUPPORTED.items():
        value = obj.get(key)
        if value is not None and value is not False and value != noop and value != {}:
            raise APIError(400, f"{key}: not supported by this server (rayllama); remove the field",
                           param=key, code="unsupported_parameter")
    messages = obj.get("messages")
    for i, m in enumerate(messages if isinstance(messages, list) else []):
        content = m.get("content") if isinstance(m, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise APIError(400, f"messages.{i}.content.{j}.type: {kind!r} parts are not supported (text "
                                    f"only); send the content as text", param=f"messages.{i}.content.{j}.type",
                               code="unsupported_parameter")
    if obj.get("top_logprobs") and obj.get("logprobs") is not True and "messages" in obj:
        raise APIError(400, "top_logprobs: needs logprobs true", param="top_logprobs")


def parse_chat_request(raw: bytes) -> ChatRequest:
    """Bytes of a request body -> ChatRequest, or APIError(400) naming the first bad field."""
    return _parse(raw, ChatRequest)  # type: ignore[return-value]


def parse_completion_request(raw: bytes) -> CompletionRequest:
    """Bytes of a /v1/completions body -> CompletionRequest, or APIError(400) naming the first bad field."""
    return _parse(raw, CompletionRequest)  # type: ignore[return-value]


def _parse(raw: bytes, model: type[SamplingRequest]) -> SamplingRequest:
    if not raw.strip():
        what = "'messages'" if model is ChatRequest else "'prompt'"
        raise APIError(400, f"request body is empty; send a JSON object with {what}", param=None)
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON ({e}); send a JSON object", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "request body is not valid JSON (nested too deeply); send a JSON object",
                       code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(obj).__name__}", code="invalid_json")
    _refuse_unsupported(obj)
    try:
        return model.model_validate(obj)
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


def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# one generated token for the logprobs fields: (token text, raw logprob, [(text, logprob) of the k best])
TokenLogprob = tuple[str, float, list[tuple[str, float]]]


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """The chat `logprobs` object: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}."""
    def one(text: str, lp: float) -> dict[str, Any]:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(t, lp), "top_logprobs": [one(bt, blp) for bt, blp in best]}
                        for t, lp, best in entries]}


def completion_logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""
    offsets, at = [], offset
    for t, _, _ in entries:
        offsets.append(at)
        at += len(t)
    return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [dict(best) for _, _, best in entries], "text_offset": offsets}


def completion_body(req_id: str, model: str, choices: list[dict[str, Any]], prompt_tokens: int,
                    completion_tokens: int, chat: bool = True) -> dict[str, Any]:
    """A `chat.completion` (chat) or `text_completion` object; `choices` from chat_choice / text_choice."""
    return {"id": req_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chat_choice(index: int, text: str, finish_reason: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def text_choice(index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chunk(req_id: str, model: str, created: int, index: int | None, delta: dict[str, Any],
          finish_reason: str | None = None, usage_: dict[str, int] | None = None,
          logprobs: dict[str, Any] | None = None) -> str:
    """One server-sent event holding a `chat.completion.chunk` (index None: the usage-only chunk, no choices)."""
    body: dict[str, Any] = {"id": req_id, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [] if index is None else
                            [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if usage_ is not None:
        body["usage"] = usage_
    return f"data: {json.dumps(body)}\n\n"


def text_chunk(req_id: str, model: str, created: int, choice: dict[str, Any] | None,
               usage_: dict[str, int] | None = None) -> str:
    """One server-sent event holding a streamed `text_completion` (choice None: the usage-only chunk)."""
    body: dict[str, Any] = {"id": req_id, "object": "text_completion", "created": created, "model": model,
                            "choices": [] if choice is None else [choice]}
    if usage_ is not None:
        body["usage"] = usage_
    return f"data: {json.dumps(body)}\n\n"


DONE = "data: [DONE]\n\n"
