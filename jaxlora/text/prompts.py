"""Prompt styles: how an instruction record (``instruction``, optional ``input``, ``system`` and
``output``) becomes the text a model reads, where its response begins (training puts the loss
on the response only) and which tokens end a response.

  alpaca         lit-llama's Alpaca template (the default: lit-llama's data and adapters)
  plain          the instruction as is, the output right after it (plain continuation)
  llama2-chat    Meta's Llama 2 chat format: [INST] <<SYS>> ... <</SYS>> ... [/INST] answer </s>
  llama3-chat    Meta's Llama 3 format: <|start_header_id|>role<|end_header_id|> ... <|eot_id|>
  chat-template  the model's own Jinja chat template (tokenizer_config.json or chat_template.jinja),
                 rendered as transformers' apply_chat_template renders it

`PromptStyle.render(record)` gives a `Rendered`: the prompt and response texts, whether a BOS id
comes first, and the token that ends the response (None: the tokenizer's EOS). BOS and the end
token are kept apart from the text so that a SentencePiece tokenizer (which never reads special
tokens out of text) gets the same ids as Meta's reference code. `encode_rendered` tokenizes it the
way lit-llama's prepare_sample does; `stop_ids` are the ids that end a generation.
The chat styles put an ``input`` after the instruction, separated by a blank line.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar

import jinja2
import numpy as np
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxlora.errors import DataError, TokenizerError
from jaxlora.text.tokenizer import TEMPLATE_TOKENS, TextTokenizer, unique

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
DEFAULT_STYLE = "alpaca"


def generate_prompt(record: dict) -> str:
    """The lit-llama Alpaca prompt for ``record``; the input template is used when ``input`` is non-empty."""
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


@dataclass(frozen=True)
class Rendered:
    """One record in a style: BOS (if `bos`) + prompt + response + the `end` token.
    end None: the tokenizer's EOS ends the response. chat: a chat format, whose BOS a tokenizer
    that reads special tokens out of text gets as text (as transformers tokenizes a rendered chat:
    with a Metaspace "first" tokenizer no word-start mark follows it)."""

    prompt: str
    response: str = ""
    bos: bool = True
    end: str | None = None
    chat: bool = False


@dataclass(frozen=True)
class Encoded:
    """A rendered record's ids (lit-llama's prepare_sample): input_ids = BOS + prompt + response
    + end, cut to max_length after the end is appended; prompt_ids = BOS + prompt, cut alike (its
    length is where the response begins); num_tokens: input_ids' length before the cut."""

    input_ids: np.ndarray
    prompt_ids: np.ndarray
    num_tokens: int


def field_text(record: Mapping[str, Any], key: str, required: bool = False) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        what = "has no" if value is None else "has a non-text"
        raise DataError(f"record {what} {key!r}: {str(dict(record))[:200]}")
    return value


def user_text(record: Mapping[str, Any]) -> str:
    """The instruction, then the input (if any) after a blank line."""
    instruction, extra = field_text(record, "instruction", required=True), field_text(record, "input")
    return f"{instruction}\n\n{extra}" if extra else instruction


class PromptStyle:
    """A prompt style; `needs` are the special tokens its text holds (the tokenizer must know them)."""

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()

    def render(self, record: Mapping[str, Any]) -> Rendered:
        raise NotImplementedError

    def check(self, tokenizer: TextTokenizer) -> None:
        """TokenizerError naming the tokenizer file when it lacks a token this style writes."""
        missing = [t for t in self.needs if t not in tokenizer.special_tokens]
        if missing:
            raise TokenizerError(f"prompt style {self.name} needs the special tokens {', '.join(missing)}; "
                                 f"tokenizer {tokenizer.path} has none of that name")

    def end_token(self) -> str | None:
        """The token that ends a response (None: the tokenizer's EOS)."""
        return self.render({"instruction": "?", "output": "."}).end

    def stop_ids(self, tokenizer: TextTokenizer) -> tuple[int, ...]:
        """Ids that end a generation: the style's end token, then every EOS id of the tokenizer."""
        return unique([end_id(self.end_token(), tokenizer), *tokenizer.eos_ids])


class Alpaca(PromptStyle):
    name = "alpaca"

    def render(self, record: Mapping[str, Any]) -> Rendered:
        field_text(record, "instruction", required=True)  # a clear error, not generate_prompt's KeyError
        return Rendered(generate_prompt(record), field_text(record, "output"))


class Plain(PromptStyle):
    name = "plain"

    def render(self, record: Mapping[str, Any]) -> Rendered:
        return Rendered(user_text(record), field_text(record, "output"))


class Llama2Chat(PromptStyle):
    """Meta's llama chat_completion: one [INST] turn (the system prompt inside it), BOS first, the
    answer stripped between single spaces, then EOS."""

    name = "llama2-chat"

    def render(self, record: Mapping[str, Any]) -> Rendered:
        system = field_text(record, "system")
        content = (f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else "") + user_text(record)
        output = field_text(record, "output")
        return Rendered(f"[INST] {content.strip()} [/INST]", f" {output.strip()} " if output else "", chat=True)


class Llama3Chat(PromptStyle):
    """Meta's Llama 3 ChatFormat: each message a header and its stripped content ending with
    <|eot_id|>; the prompt ends with the assistant's header."""

    name = "llama3-chat"
    needs = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

    @staticmethod
    def message(role: str, content: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>"

    def render(self, record: Mapping[str, Any]) -> Rendered:
        system = field_text(record, "system")
        prompt = (self.message("system", system) if system else "") + self.message("user", user_text(record))
        prompt += "<|start_header_id|>assistant<|end_header_id|>\n\n"
        return Rendered(prompt, field_text(record, "output").strip(), end="<|eot_id|>", chat=True)


# ----------------------------------------------------------------------------- the model's chat template


class GenerationTag(Extension):
    """{% generation %}...{% endgeneration %}: transformers marks the assistant's text with it
    (for its assistant mask); here it renders its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> list:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def raise_exception(message: str) -> None:
    """A template's own refusal (e.g. roles that do not alternate)."""
    raise jinja2.exceptions.TemplateError(message)


def to_json(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """tojson as chat templates expect it: plain JSON (Jinja's own escapes <, > and &)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(fmt: str) -> str:
    """Today's date for templates that state it (Llama 3.1's "Today Date")."""
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def compile_template(template: str) -> jinja2.Template:
    """The template in a sandbox (templates come from model repositories: untrusted code), with
    the block trimming and helpers chat templates are written for."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = to_json
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def split_end(text: str, output: str, special_texts: tuple[str, ...]) -> tuple[str, str | None]:
    """(response, end token) of what a template adds for the assistant's `output`: the text up to
    the first special token after the output; what follows that token (a template's separator
    before the next turn, e.g. ChatML's newline) is not the model's to say."""
    start = text.find(output.strip()) + len(output.strip()) if output.strip() in text else 0
    found = [(pos, -len(s), s) for s in special_texts if s and (pos := text.find(s, start)) >= 0]
    if not found:
        return text, None
    pos, _, token = min(found)
    return text[:pos], token


@dataclass(frozen=True)
class ChatTemplate(PromptStyle):
    """The model's own chat template: the prompt is the conversation (system?, user) rendered
    with add_generation_prompt; the response is what the full conversation adds to it."""

    template: str
    source: str  # the file it came from
    variables: tuple[tuple[str, str], ...]  # bos_token, eos_token, ... as the template sees them
    special_texts: tuple[str, ...]  # the tokenizer's special tokens: one of them ends a response

    name: ClassVar[str] = "chat-template"

    @classmethod
    def from_tokenizer(cls, tokenizer: TextTokenizer) -> ChatTemplate:
        files = tokenizer.model_files
        if files.chat_template is None:
            raise TokenizerError(f"prompt style chat-template: the model ships no chat template (no chat_template in "
                                 f"{files.directory / 'tokenizer_config.json'}, no chat_template.jinja)")
        variables = tuple((k, v) for k in TEMPLATE_TOKENS if (v := files.token(k)) is not None)
        specials = tuple(sorted(tokenizer.special_tokens))
        return cls(files.chat_template, str(files.chat_template_source), variables, specials)

    def text(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return compile_template(self.template).render(messages=messages, tools=None, documents=None,
                                                          add_generation_prompt=add_generation_prompt,
                                                          **dict(self.variables))
        except jinja2.exceptions.TemplateError as err:
            raise TokenizerError(f"{self.source}: chat template: {err}") from None

    def render(self, record: Mapping[str, Any]) -> Rendered:
        system = field_text(record, "system")
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user_text(record)}]
        prompt = self.text(messages, add_generation_prompt=True)
        output = field_text(record, "output")
        full = self.text(messages + [{"role": "assistant", "content": output}], False)
        if not full.startswith(prompt):
            raise TokenizerError(f"{self.source}: the chat template's conversation does not begin with its "
                                 "generation prompt, so the prompt cannot be told from the response")
        response, end = split_end(full[len(prompt):], output, self.special_texts)
        bos_text = dict(self.variables).get("bos_token", "")
        bos = bool(bos_text) and prompt.startswith(bos_text)  # BOS as an id, as the other styles give it
        return Rendered(prompt[len(bos_text):] if bos else prompt, response, bos, end, chat=True)


STYLES: dict[str, type[PromptStyle]] = {s.name: s for s in (Alpaca, Plain, Llama2Chat, Llama3Chat, ChatTemplate)}
PROMPT_STYLES = tuple(STYLES)


def get_style(name: str, tokenizer: TextTokenizer | None = None) -> PromptStyle:
    """The style called `name`, checked against `tokenizer` when given (chat-template needs it)."""
    if name not in STYLES:
        raise ValueError(f"unknown prompt style {name!r}; known: {', '.join(PROMPT_STYLES)}")
    if name == ChatTemplate.name:
        if tokenizer is None:
            raise ValueError("prompt style chat-template needs the tokenizer (the template is in the model's files)")
        style: PromptStyle = ChatTemplate.from_tokenizer(tokenizer)
    else:
        style = STYLES[name]()
    if tokenizer is not None:
        style.check(tokenizer)
    return style


def end_id(end: str | None, tokenizer: TextTokenizer) -> int:
    """The id of a response's end token (None: the tokenizer's EOS)."""
    if end is None:
        return tokenizer.eos_id
    token_id = tokenizer.token_id(end)
    if token_id is None:
        raise TokenizerError(f"tokenizer {tokenizer.path} has no token {end!r} (the end of a response)")
    return token_id


def encode_text(rendered: Rendered, text: str, tokenizer: TextTokenizer, eos: bool = False,
                max_length: int = -1) -> np.ndarray:
    """`text` (the rendered prompt, or more) with the rendering's BOS: as text for a chat format
    and a tokenizer that reads special tokens, else as an id (lit-llama's encode)."""
    if rendered.bos and rendered.chat and tokenizer.reads_special_tokens and tokenizer.bos_id is not None:
        return tokenizer.encode(tokenizer.token_text(tokenizer.bos_id) + text, bos=False, eos=eos,
                                max_length=max_length)
    return tokenizer.encode(text, bos=rendered.bos, eos=eos, max_length=max_length)


def encode_prompt(rendered: Rendered, tokenizer: TextTokenizer, max_length: int = -1) -> np.ndarray:
    """The ids a generation starts from: BOS and the prompt."""
    return encode_text(rendered, rendered.prompt, tokenizer, max_length=max_length)


def encode_rendered(rendered: Rendered, tokenizer: TextTokenizer, max_length: int = -1) -> Encoded:
    """Token ids of a rendered record, as lit-llama's prepare_sample makes them (for alpaca: the
    same ids): prompt and response encoded together, the end appended, then the cut."""
    ids = encode_text(rendered, rendered.prompt + rendered.response, tokenizer, eos=rendered.end is None)
    if rendered.end is not None:
        ids = np.append(ids, np.int32(end_id(rendered.end, tokenizer))).astype(np.int32)
    prompt_ids = encode_prompt(rendered, tokenizer, max_length)
    return Encoded(ids[:max_length] if max_length > 0 else ids, prompt_ids, len(ids))
