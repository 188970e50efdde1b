"""The OpenAI API's request bodies (the fields we serve), validated strictly, and its error shape.

Strict means: a wrong type is an error, not a coercion (``"max_tokens": "12"`` is a 400 naming ``max_tokens``), and
ranges are OpenAI's (temperature 0..2, top_p in (0, 1], at most 4 stop strings). Unknown fields are ignored, as
OpenAI's clients send fields we do not use (``user``, ``logit_bias`` at its default, ...). Fields that would change
the result and that we do not implement (``n`` > 1, ``logprobs``, ``echo``, ``best_of`` > 1) are refused by name
rather than silently ignored.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

__all__ = ["CompletionRequest", "ChatCompletionRequest", "ChatMessage", "error_body"]

_Number = Union[StrictInt, StrictFloat]


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = Field(default=None, ge=0)
    temperature: Optional[_Number] = Field(default=None, ge=0, le=2)
    top_p: Optional[_Number] = Field(default=None, gt=0, le=1)
    seed: Optional[StrictInt] = None
    stop: Optional[Union[StrictStr, List[StrictStr]]] = None
    stream: StrictBool = False
    stream_options: Optional[Dict[str, Any]] = None
    n: StrictInt = Field(default=1, ge=1, le=1, description="one choice per request")
    logprobs: Optional[Any] = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: Any) -> Any:
        if value not in (None, False, 0):
            raise ValueError("logprobs are not supported by this server")
        return value

    def stop_strings(self) -> List[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` as text or as token ids (one prompt per request)."""

    prompt: Union[StrictStr, List[StrictInt]]
    echo: StrictBool = False
    best_of: Optional[StrictInt] = Field(default=None, ge=1, le=1)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported by this server")
        return value


class _ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[StrictStr, List[_ContentPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: the messages go through the tokenizer's chat template."""

    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(default=None, ge=0)

    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def error_body(message: str, *, kind: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> Dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
