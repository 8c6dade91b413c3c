"""The OpenAI request and response shapes `minillm serve` speaks, and their validation.

Requests are checked with pydantic (FastAPI's own validator) in strict mode, so a wrong type is
refused rather than coerced ("10" is not an integer). Every refusal is an `ApiError`, answered as
OpenAI answers: `{"error": {"message", "type", "param", "code"}}`, with `param` naming the field
(`messages.2.role`, `temperature`). What minillm does not do (`n` > 1, tools, logprobs, penalties,
logit_bias, echo, suffix, a non-text response_format) is refused by name, never silently ignored;
fields this module does not know are ignored, as llama-cpp-python's and vLLM's servers do.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

MAX_SEED = (1 << 64) - 1


class ApiError(Exception):
    """A request refused: the HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error",
                             429: "rate_limit_exceeded", 503: "server_error"}.get(status, "invalid_request_error"
                                                                                  if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------------------------
# Requests


Number = Union[StrictInt, StrictFloat]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[TextPart], None] = None
    name: StrictStr | None = None
    tool_calls: Any = None
    tool_call_id: Any = None


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class _Common(_Strict):
    model: StrictStr
    max_tokens: StrictInt | None = Field(default=None, ge=0)
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    seed: StrictInt | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: Union[StrictStr, list[StrictStr], None] = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    n: StrictInt | None = Field(default=None, ge=1)
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=0)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None


class CompletionRequest(_Common):
    prompt: Union[StrictStr, list[StrictStr]]
    echo: StrictBool | None = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = Field(default=None, ge=1)


@dataclass
class Limits:
    """What one request may ask for (the `minillm serve` flags of the same names)."""
    max_body_bytes: int = 4 << 20
    max_messages: int = 4096
    max_prompt_tokens: int = 65536
    max_tokens: int = 16384
    default_max_tokens: int = 512
    max_stops: int = 4


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "TextPart", "StreamOptions"}


def _pydantic_error(e: ValidationError) -> ApiError:
    err = e.errors(include_url=False)[0]
    # a union's member (str, list[str], TextPart) is not a field: keep the field path only
    loc = [str(x) for x in err.get("loc", ()) if str(x) not in _TYPE_TAGS and "[" not in str(x)]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        msg = "is required"
    return ApiError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


def _unsupported(name: str, why: str = "") -> ApiError:
    return ApiError(400, f"{name}: not supported by minillm serve{why}", param=name, code="unsupported_parameter")


def parse_body(raw: bytes) -> dict:
    """The request's JSON object; anything else is a 400."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({' '.join(str(e).split())[:200]})",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _check_common(r: _Common, limits: Limits, served: str) -> None:
    if r.model != served:
        raise ApiError(404, f"model {r.model[:200]!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")
    if r.n not in (None, 1):
        raise _unsupported("n", " (one choice per request)")
    if r.logprobs not in (None, False, 0):
        raise _unsupported("logprobs")
    if r.top_logprobs not in (None, 0):
        raise _unsupported("top_logprobs")
    if r.logit_bias not in (None, {}):
        raise _unsupported("logit_bias")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(r, name) not in (None, 0):
            raise _unsupported(name)
    stops = [r.stop] if isinstance(r.stop, str) else (r.stop or [])
    if len(stops) > limits.max_stops:
        raise ApiError(400, f"stop: at most {limits.max_stops} stop sequences, got {len(stops)}", param="stop",
                       code="invalid_value")
    if any(not s for s in stops):
        raise ApiError(400, "stop: a stop sequence must not be empty", param="stop", code="invalid_value")
    if not r.stream and r.stream_options is not None:
        raise ApiError(400, "stream_options: only allowed with stream=true", param="stream_options",
                       code="invalid_value")


def _max_tokens(value: int | None, name: str, limits: Limits) -> int:
    if value is None:
        return limits.default_max_tokens
    if value > limits.max_tokens:
        raise ApiError(400, f"{name}: at most {limits.max_tokens} tokens per request (--max-tokens-limit), "
                            f"got {value}", param=name, code="invalid_value")
    return value


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content)


@dataclass
class Job:
    """A checked request, as the engine takes it."""
    kind: str  # "chat" or "completion"
    prompt: Any  # the messages ([{"role", "content"}]) or the prompt text
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]
    stream: bool
    include_usage: bool
    user: str | None


def _validated(model, body: dict):
    """`body` as the request model `model`, or an ApiError naming the first field pydantic refused."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise _pydantic_error(e) from None


def parse_chat(body: dict, limits: Limits, served: str) -> Job:
    r = _validated(ChatRequest, body)
    _check_common(r, limits, served)
    for name in ("tools", "functions"):
        if getattr(r, name) not in (None, []):
            raise _unsupported(name)
    for name in ("tool_choice", "function_call"):
        if getattr(r, name) not in (None, "none"):
            raise _unsupported(name)
    if r.response_format not in (None, {"type": "text"}):
        raise _unsupported("response_format", " (only {\"type\": \"text\"})")
    if len(r.messages) > limits.max_messages:
        raise ApiError(400, f"messages: at most {limits.max_messages} messages per request (--max-messages), got "
                            f"{len(r.messages)}", param="messages", code="invalid_value")
    messages = []
    for i, m in enumerate(r.messages):
        if m.tool_calls is not None or m.tool_call_id is not None:
            raise _unsupported(f"messages.{i}.tool_calls")
        role = "system" if m.role == "developer" else m.role
        messages.append({"role": role, "content": _text(m.content)})
    if messages[-1]["role"] != "user":
        raise ApiError(400, f"messages.{len(messages) - 1}.role: the last message must be the user's, got "
                            f"{messages[-1]['role']!r}", param=f"messages.{len(messages) - 1}.role",
                       code="invalid_value")
    if r.max_tokens is not None and r.max_completion_tokens is not None and r.max_tokens != r.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens differ (give one)", param="max_completion_tokens",
                       code="invalid_value")
    name, given = ("max_completion_tokens", r.max_completion_tokens) if r.max_completion_tokens is not None \
        else ("max_tokens", r.max_tokens)
    return Job("chat", messages, _max_tokens(given, name, limits), *_sampling(r), _stops(r), bool(r.stream),
               bool(r.stream_options and r.stream_options.include_usage), r.user)


def parse_completion(body: dict, limits: Limits, served: str) -> Job:
    r = _validated(CompletionRequest, body)
    _check_common(r, limits, served)
    if r.echo:
        raise _unsupported("echo")
    if r.suffix:
        raise _unsupported("suffix")
    if r.best_of not in (None, 1):
        raise _unsupported("best_of")
    prompt = r.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, f"prompt: one prompt per request, got a list of {len(prompt)}", param="prompt",
                           code="unsupported_parameter")
        prompt = prompt[0]
    if not prompt:
        raise ApiError(400, "prompt: must not be empty", param="prompt", code="invalid_value")
    return Job("completion", prompt, _max_tokens(r.max_tokens, "max_tokens", limits), *_sampling(r), _stops(r),
               bool(r.stream), bool(r.stream_options and r.stream_options.include_usage), r.user)


def _sampling(r: _Common) -> tuple[float, float, int | None]:
    """(temperature, top_p, seed) with OpenAI's defaults: temperature 1, top_p 1."""
    return (1.0 if r.temperature is None else float(r.temperature), 1.0 if r.top_p is None else float(r.top_p),
            r.seed)


def _stops(r: _Common) -> list[str]:
    return [r.stop] if isinstance(r.stop, str) else list(r.stop or [])


# ----------------------------------------------------------------------------------------------
# Responses


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def response(kind: str, rid: str, model: str, text: str, finish: str, use: dict, fingerprint: str | None) -> dict:
    """A whole (non-streamed) chat.completion or text_completion."""
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "system_fingerprint": fingerprint,
            "choices": [choice], "usage": use}


def chunk(kind: str, rid: str, model: str, created: int, fingerprint: str | None, *, text: str | None = None,
          role: bool = False, finish: str | None = None, use: dict | None = None, include_usage: bool = False,
          no_choices: bool = False) -> dict:
    """One event of a stream: chat.completion.chunk or text_completion."""
    if no_choices:
        choices = []
    elif kind == "chat":
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
            delta["content"] = ""
        if text is not None:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    out = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
           "created": created, "model": model, "system_fingerprint": fingerprint, "choices": choices}
    if include_usage:
        out["usage"] = use
    return out


def sse(data: dict | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
