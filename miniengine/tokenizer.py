"""Text in and out: the `tokenizers` tokenizer, the checkpoint's chat template, incremental detokenization.

Incremental detokenization: a token can carry half of a multi-byte character (an emoji is often split
across byte-level tokens), so decoding one token at a time would print garbage. Instead decode a short
window of recent tokens twice, with and without the new ones, and emit the difference only once it no
longer ends in the replacement character U+FFFD:

    ids    ... [ 12  873 | 240  159 ]      prefix_offset ^      ^ read_offset
    text of [12 873]           = "a cat"
    text of [12 873 240 159]   = "a cat \ufffd"     -> incomplete: emit nothing yet
    text of [... 240 159 152]  = "a cat 😊"         -> emit " 😊", move both offsets on
"""

from __future__ import annotations

import json
from collections.abc import Sequence as Seq
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.sandbox
import tokenizers


class ChatTemplateError(ValueError):
    pass


class Tokenizer:
    def __init__(self, tokenizer: tokenizers.Tokenizer, config: dict, eos_token_ids: Seq[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.chat_template: str | None = config.get("chat_template")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token_id = tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        self.add_bos_token = bool(config.get("add_bos_token", False))
        ids = set(eos_token_ids)
        if self.eos_token and tokenizer.token_to_id(self.eos_token) is not None:
            ids.add(tokenizer.token_to_id(self.eos_token))
        self.eos_token_ids = ids

    @classmethod
    def from_dir(cls, path: str | Path, eos_token_ids: Seq[int] = ()) -> Tokenizer | None:
        """The tokenizer of a Hugging Face model directory, or None if it has no tokenizer.json."""
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            return None
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        template_file = path / "chat_template.jinja"
        if "chat_template" not in config and template_file.exists():
            config["chat_template"] = template_file.read_text()
        return cls(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")), config, eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Seq[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template: send a plain prompt instead of messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ChatTemplateError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        return _compile(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


def _token_text(token: str | dict | None) -> str | None:
    return token.get("content") if isinstance(token, dict) else token  # tokenizer_config may hold AddedToken dicts


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


_templates: dict[str, jinja2.Template] = {}


def _compile(source: str) -> jinja2.Template:
    if source not in _templates:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _templates[source] = env.from_string(source)
    return _templates[source]


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a character."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-6:])  # a little prompt context, so a leading space decodes right
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        text = decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        if text.endswith("\ufffd") or len(text) <= len(prefix):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix) :]
