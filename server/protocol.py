"""The wire format: OpenAI's request and response bodies as pydantic models.

These models are the one description of what the server accepts: FastAPI validates every body against
them and publishes them as the OpenAPI schema, so the schema a client (or a fuzzer) reads is exactly the
rule the server applies. Types are strict (a string is not a number) and numbers are finite. Limits
that depend on how the server was started (`--max-n`, `--max-completion-tokens`, ...) are checked after
validation and answered with 400, which the schema lists.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from miniengine.sampling_params import MAX_LOGPROBS, MAX_N


def _integral(value: object) -> object:
    # JSON Schema counts 2.0 as an integer (and clients in some languages send whole numbers that way);
    # 2.5, "2" and true are refused.
    return int(value) if isinstance(value, float) and value.is_integer() else value


def Int(ge: int | None = None, le: int | None = None) -> type[int]:  # noqa: N802 (used as a type)
    """An int in [ge, le]; the bounds come before the validator so that the JSON schema shows them."""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_integral)]  # type: ignore[return-value]


TokenId = Int(0, 2**31 - 1)
NonEmptyText = Annotated[str, Field(min_length=1)]
FinishReason = Literal["stop", "length", "abort"]


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI's own clients send fields a server may not know.
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """The fields both endpoints share; see `SamplingParams` for what each does."""

    model: str | None = Field(None, description="the served model's name; omitted: the served model")
    max_tokens: Int(1) | None = Field(None, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: Int(-1, 2**31 - 1) = Field(-1, description="-1 or 0 keeps every token")
    min_p: float = Field(0.0, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    stop: NonEmptyText | list[NonEmptyText] | None = Field(None, description="strings that end a completion")
    stop_token_ids: list[TokenId] | None = None
    seed: Int(-(2**63), 2**64 - 1) | None = Field(None, description="the same seed, the same tokens")
    n: Int(1, MAX_N) = Field(1, description="completions of each prompt")
    ignore_eos: bool = False
    min_tokens: Int(0) = 0
    skip_special_tokens: bool = True
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(_Sampling):
    prompt: (
        NonEmptyText
        | Annotated[list[NonEmptyText], Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    ) = Field(description="a string, a list of strings, token ids, or a list of token-id lists")
    echo: bool = Field(False, description="put the prompt before each completion")
    logprobs: Int(0, MAX_LOGPROBS) | None = Field(None, description="top-N log-probabilities per token")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int(1) | None = Field(None, description="OpenAI's newer name for max_tokens")
    logprobs: bool = False
    top_logprobs: Int(0, MAX_LOGPROBS) | None = Field(None, description="needs logprobs: true")


# ---- responses ---------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = Field(None, description="cached_tokens: prefix-cache hits")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = Field(None, description="the stop string or stop token id that ended it")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None  # in a stream, only in the last chunk (stream_options.include_usage)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "miniengine"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizePrompt(_Body):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeChat(_Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
