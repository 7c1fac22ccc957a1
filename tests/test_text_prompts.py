"""jaxlora.text.prompts: the llama3-chat and llama2-chat styles give apply_chat_template's text
(and ids) for templates written here from Meta's published prompt formats; the chat-template style
renders any template as transformers does; alpaca stays lit-llama's prepare_sample, id for id."""
from __future__ import annotations

import numpy as np
import pytest
from test_text_tokenizer import DEMO_TOKENIZER, llama2_dir, llama3_dir, reference

from jaxlora.errors import DataError, TokenizerError
from jaxlora.text.prompts import (
    PROMPT_STYLES,
    Rendered,
    encode_rendered,
    end_id,
    generate_prompt,
    get_style,
)
from jaxlora.text.tokenizer import Tokenizer, open_tokenizer

# Meta's Llama 3 format (llama-models' prompt format page): each message is
# <|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>, BOS first, and the prompt
# ends with the assistant's header.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + (m['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Meta's Llama 2 chat format: <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s>
LLAMA2_TEMPLATE = """{% if messages[0]['role'] == 'system' %}
{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}
{% else %}
{% set system = '' %}{% set turns = messages %}
{% endif %}
{% for m in turns %}
{% if (m['role'] == 'user') != loop.index0 is even %}
{{ raise_exception('turns must alternate user, assistant') }}{% endif %}
{% if m['role'] == 'user' %}
{% set content = ('<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' if loop.first and system else '') + m['content'] %}
{{ bos_token + '[INST] ' + (content | trim) + ' [/INST]' }}{% else %}
{{ ' ' + (m['content'] | trim) + ' ' + eos_token }}{% endif %}
{% endfor %}"""
# ChatML-like, with a separator after each end token and the helpers transformers gives templates
CHATML_TEMPLATE = """{% set ns = namespace(count=0) %}
{% for m in messages %}
{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}
{% set ns.count = ns.count + 1 %}
{{ '<|start_header_id|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}
{% generation %}{{ m['content'] }}{% endgeneration %}{% else %}
{{ m['content'] + ' ' + ({'n': ns.count, 'text': '<é & "x">'} | tojson) }}{% endif %}
{{ eos_token + '\\n' }}{% endfor %}
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant\\n' }}{% endif %}"""

RECORDS = [
    {"instruction": "Reverse the word rocket.", "output": "tekcor"},
    {"instruction": "  Translate to French:  ", "input": "good morning", "output": "  bonjour \n"},
    {"instruction": "Say hello.", "system": "You are terse.", "output": "Hello world"},
    {"instruction": "Count: 日本語 🌍", "input": "1 2 3", "system": "Be exact.\n", "output": "three"},
]


def messages(record: dict, with_output: bool) -> list[dict[str, str]]:
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    chat = ([{"role": "system", "content": record["system"]}] if record.get("system") else []) + [
        {"role": "user", "content": user}]
    return chat + ([{"role": "assistant", "content": record["output"]}] if with_output else [])


def template_texts(hf, record: dict) -> tuple[str, str]:
    """transformers' (prompt, full conversation) texts for a record."""
    prompt = hf.apply_chat_template(messages(record, False), tokenize=False, add_generation_prompt=True)
    return prompt, hf.apply_chat_template(messages(record, True), tokenize=False)


def template_ids(hf, record: dict) -> tuple[list[int], list[int]]:
    def ids(chat: list, gen: bool) -> list[int]:
        out = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen, return_dict=True)
        return list(out["input_ids"])
    return ids(messages(record, False), True), ids(messages(record, True), False)


def as_text(r: Rendered, tok) -> tuple[str, str]:
    """(BOS + prompt, BOS + prompt + response + end) as text."""
    head = (tok.token_text(tok.bos_id) if r.bos else "") + r.prompt
    return head, head + r.response + (r.end if r.end is not None else tok.token_text(tok.eos_id))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("prompts")
    return {"llama3": llama3_dir(root / "llama3", LLAMA3_TEMPLATE),
            "llama2": llama2_dir(root / "llama2", LLAMA2_TEMPLATE),
            "chatml": llama3_dir(root / "chatml", CHATML_TEMPLATE)}


@pytest.mark.parametrize("style, which", [("llama3-chat", "llama3"), ("llama2-chat", "llama2")])
def test_chat_styles_equal_apply_chat_template(dirs, style, which):
    tok, hf = open_tokenizer(dirs[which]), reference(dirs[which])
    for record in RECORDS:
        rendered = get_style(style, tok).render(record)
        assert as_text(rendered, tok) == template_texts(hf, record), record
        encoded = encode_rendered(rendered, tok)
        prompt_ids, full_ids = template_ids(hf, record)
        assert encoded.prompt_ids.tolist() == prompt_ids, record
        assert encoded.input_ids.tolist() == full_ids, record
        # the same text through the model's own template (chat-template style)
        via = get_style("chat-template", tok).render(record)
        assert (via.prompt, via.response, via.bos) == (rendered.prompt, rendered.response, rendered.bos), record
        assert end_id(via.end, tok) == end_id(rendered.end, tok)  # "</s>" there, the EOS (None) here


@pytest.mark.parametrize("which", ["llama3", "llama2", "chatml"])
def test_chat_template_style_renders_as_transformers(dirs, which):
    tok, hf = open_tokenizer(dirs[which]), reference(dirs[which])
    style = get_style("chat-template", tok)
    for record in RECORDS:
        rendered = style.render(record)
        head, full = as_text(rendered, tok)
        prompt, conversation = template_texts(hf, record)
        assert head == prompt
        assert conversation.startswith(full) and conversation[len(full):] in ("", "\n")  # ChatML's separator
        encoded = encode_rendered(rendered, tok)
        assert encoded.prompt_ids.tolist() == template_ids(hf, record)[0]
        assert encoded.input_ids[len(encoded.prompt_ids):].tolist()[-1] == tok.token_id(rendered.end or "")


def test_what_ends_a_response(dirs):
    llama3 = open_tokenizer(dirs["llama3"])
    assert get_style("llama3-chat", llama3).stop_ids(llama3) == (128009, 128001, 128008)
    assert get_style("alpaca", llama3).stop_ids(llama3) == llama3.eos_ids
    llama2 = open_tokenizer(dirs["llama2"])
    assert get_style("llama2-chat", llama2).stop_ids(llama2) == (2,)
    assert get_style("chat-template", llama2).end_token() == "</s>"


def test_alpaca_is_lit_llamas_prepare_sample():
    from jaxlora.train.data import prepare_sample
    tok = Tokenizer(DEMO_TOKENIZER)
    style = get_style("alpaca", tok)
    for record in RECORDS[:2]:
        for max_length in (-1, 256, 12):
            lit = prepare_sample(record, tok, max_length=max_length)
            ours = encode_rendered(style.render(record), tok, max_length)
            assert ours.input_ids.dtype == np.int32
            assert ours.input_ids.tolist() == lit["input_ids"].tolist()
            assert ours.prompt_ids.tolist() == lit["input_ids_no_response"].tolist()
            assert ours.num_tokens == lit["num_tokens"]
        assert style.render(record).prompt == generate_prompt(record)


def test_llama2_chat_with_sentencepiece_is_metas_encoding():
    """Meta's chat_completion encodes f"[INST] {user} [/INST] {answer} " with BOS and EOS ids."""
    tok = Tokenizer(DEMO_TOKENIZER)
    record = RECORDS[0]
    encoded = encode_rendered(get_style("llama2-chat", tok).render(record), tok)
    text = f"[INST] {record['instruction']} [/INST] {record['output']} "
    assert encoded.input_ids.tolist() == [1] + tok.processor.encode(text) + [2]
    assert encoded.input_ids.tolist()[:len(encoded.prompt_ids)] == encoded.prompt_ids.tolist()


def test_plain_is_the_text_as_is():
    r = get_style("plain").render({"instruction": "Once upon", "output": " a time"})
    assert (r.prompt, r.response, r.bos, r.end) == ("Once upon", " a time", True, None)


def test_refusals_are_named(dirs, tmp_path):
    sp = Tokenizer(DEMO_TOKENIZER)
    with pytest.raises(TokenizerError, match=f"llama3-chat needs the special tokens .*{DEMO_TOKENIZER}"):
        get_style("llama3-chat", sp)
    with pytest.raises(TokenizerError, match="ships no chat template"):
        get_style("chat-template", sp)
    with pytest.raises(ValueError, match="unknown prompt style 'vicuna'; known: " + ", ".join(PROMPT_STYLES)):
        get_style("vicuna")
    with pytest.raises(DataError, match="record has no 'instruction'"):
        get_style("alpaca").render({"output": "x"})
    llama2 = get_style("chat-template", open_tokenizer(dirs["llama2"]))
    bad = {"instruction": "hi", "system": "s", "output": "o"}
    with pytest.raises(TokenizerError, match="tokenizer_config.json: chat template: unknown role"):
        get_style("chat-template", open_tokenizer(dirs["chatml"])).text([{"role": "tool", "content": "x"}], False)
    assert llama2.render(bad).prompt.startswith("[INST] <<SYS>>")
    with pytest.raises(TokenizerError, match="turns must alternate"):
        llama2.text([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], False)
