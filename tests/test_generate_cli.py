"""generate.py (the CLI) and jaxlora.infer.load on the shipped demo model: every adapter source
gives the same greedy answer, and bad input is refused with an error naming it."""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import generate as cli  # noqa: E402
from jaxlora.config import LLaMAConfig, LoRAConfig  # noqa: E402
from jaxlora.demo import DEMO_DIR  # noqa: E402
from jaxlora.model.layouts import init_adapters  # noqa: E402
from jaxlora.model.llama import LLaMA  # noqa: E402
from jaxlora.weights.jaxlora_dir import save_checkpoint  # noqa: E402

DEMO_BASE = DEMO_DIR / "lit-llama-demo.pth"
GREEDY = ["--temperature", "0", "--max_new_tokens", "8"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Random non-zero q,v adapters for the demo model: an adapters dir and lit-llama's LoRA file."""
    d = tmp_path_factory.mktemp("adapters")
    config, lora_config = LLaMAConfig.from_name("demo"), LoRAConfig(r=4, alpha=8, targets=("q", "v"))
    lora = init_adapters(LLaMA(config, lora_config), jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(1), x.shape), lora)
    save_checkpoint(d / "adapters", config, lora_config, None, lora, base=str(DEMO_BASE))
    pytest.importorskip("torch")
    from jaxlora.weights.lit_files import save_lit_lora
    save_lit_lora(lora, config, lora_config, d / "lora.pth")
    tiny = LLaMAConfig.from_name("tiny")  # adapters for another model size
    tiny_lora = init_adapters(LLaMA(tiny, lora_config), jax.random.key(2))
    save_checkpoint(d / "tiny_adapters", tiny, lora_config, None, tiny_lora, base=str(DEMO_BASE))
    return d


def test_demo_streams_the_answer_and_reports_speed(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no out/demo here: the base model alone
    rc, out, err = run(capsys, *GREEDY)
    assert rc == 0, err
    assert out.strip() and "time to first token" in err and "tokens/s" in err and "base model only" in err


def test_every_adapter_source_gives_the_same_answer(capsys, adapters):
    tok = ["--tokenizer_path", str(DEMO_DIR / "tokenizer.model"), "--prompt", "Reverse the word rocket."]
    rc, from_dir, err = run(capsys, *GREEDY, *tok, "--adapters", str(adapters / "adapters"))  # base from config.json
    assert rc == 0, err
    assert "adapters" in err and from_dir.strip()
    rc, from_lit, err = run(capsys, *GREEDY, *tok, "--pretrained_path", str(DEMO_BASE), "--lora_path",
                            str(adapters / "lora.pth"), "--lora_alpha", "8")
    assert rc == 0, err
    rc, unmerged, err = run(capsys, *GREEDY, *tok, "--pretrained_path", str(DEMO_BASE), "--adapters",
                            str(adapters / "adapters"), "--unmerged")
    assert rc == 0, err
    # the weights read straight into one array per layer (the GPU layout) instead of stacked
    rc, per_layer, err = run(capsys, *GREEDY, *tok, "--adapters", str(adapters / "adapters"), "--no-scan_layers")
    assert rc == 0, err
    assert from_dir == from_lit == unmerged == per_layer


@pytest.mark.parametrize("argv, message", [
    (["--tokenizer_path", "nowhere/tokenizer.model"], "nowhere/tokenizer.model"),
    (["--top_k", "-5"], "--top_k -5: give a positive number of tokens, or 0 or none for no limit"),
    (["--top_k", "many"], "--top_k many"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt", ""], "--prompt is empty"),
    (["--max_new_tokens", "400"], "exceeds the model's context"),
    (["--checkpoint_dir", "nowhere", "--tokenizer_path", str(DEMO_DIR / "tokenizer.model")],
     "--checkpoint_dir nowhere"),
    # the missing weights are the problem, not the tokenizer that would have come with them
    (["--checkpoint_dir", "/tmp/does-not-exist"], "--checkpoint_dir /tmp/does-not-exist: no such directory"),
    (["--checkpoint_dir", "README.md"], "--checkpoint_dir README.md: a file, not a directory"),
    (["--pretrained_path", "nowhere.pth"], "--pretrained_path nowhere.pth: no such file or directory"),
    (["--adapters", "nowhere"], "--adapters nowhere: no such directory"),
])
def test_bad_input_is_named(capsys, argv, message):
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and message in err, err


def test_adapters_for_another_model_size_are_refused(capsys, adapters):
    rc, _, err = run(capsys, "--pretrained_path", str(DEMO_BASE), "--adapters", str(adapters / "tiny_adapters"),
                     "--tokenizer_path", str(DEMO_DIR / "tokenizer.model"))
    assert rc == 2 and "tiny_adapters" in err and "adapters for another model size" in err and "n_embd" in err, err


def test_no_flags_shows_the_instruction_the_right_answer_and_decodes_greedily(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, "--max_new_tokens", "8")
    assert rc == 0, err
    assert "instruction: Reverse the word rocket." in err and "the right answer is 'tekcor'" in err, err
    assert "tiny" in err and "greedy" in err, err
    assert "rocket" not in out and out.strip()  # stdout: the model's text only
    rc, out_again, _ = run(capsys, "--max_new_tokens", "8", "--seed", "7")
    assert out_again == out  # greedy: the seed does not matter
    rc, greedy, err = run(capsys, "--max_new_tokens", "8", "--temperature", "0")
    assert greedy == out and "greedy decoding" not in err  # asked for explicitly: no note


def test_model_flags_take_the_tokenizer_from_the_weights(capsys, adapters, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no checkpoints/lit-llama/tokenizer.model here
    rc, from_dir, err = run(capsys, *GREEDY, "--adapters", str(adapters / "adapters"))  # its base: the demo .pth
    assert rc == 0, err
    assert f"tokenizer {DEMO_DIR / 'tokenizer.model'}" in err, err
    rc, from_pth, err = run(capsys, *GREEDY, "--pretrained_path", str(DEMO_BASE), "--adapters",
                            str(adapters / "adapters"))
    assert rc == 0 and from_pth == from_dir, err


def test_the_demo_reads_its_own_trained_adapters(capsys, adapters, tmp_path, monkeypatch):
    """out/demo/adapters (what `python train.py` leaves) is used with no flags, and alone by --adapters."""
    import shutil
    monkeypatch.chdir(tmp_path)
    shutil.copytree(adapters / "adapters", tmp_path / "out" / "demo" / "adapters")
    rc, demo, err = run(capsys, *GREEDY)
    assert rc == 0 and "base model only" not in err and "adapters out/demo/adapters" in err, err
    rc, alone, err = run(capsys, *GREEDY, "--adapters", "out/demo/adapters", "--prompt", "Reverse the word rocket.")
    assert rc == 0 and alone == demo, err


@pytest.mark.parametrize("off", ["0", "none", "None"])
def test_top_k_zero_or_none_switches_it_off(capsys, off):
    rc, _, err = run(capsys, "--top_k", off, "--temperature", "1", "--max_new_tokens", "4")
    assert rc == 0, err


def test_help_states_the_code_defaults(capsys):
    from jaxlora.demo import DEMO_INSTRUCTION
    from jaxlora.infer.load import LIT_TOKENIZER
    from jaxlora.infer.session import LIT_PROMPT, LIT_TEMPERATURE, GenerateOptions
    parser = cli.build_parser()
    defaults, help_text = vars(parser.parse_args([])), " ".join(parser.format_help().split())
    assert GenerateOptions(**defaults) == GenerateOptions()  # every flag's default is the session's
    for fact in (repr(LIT_PROMPT), repr(DEMO_INSTRUCTION), str(LIT_TOKENIZER), f"default {LIT_TEMPERATURE}",
                 "0 or none: no limit (default 200)", "default 100", "default 1234"):
        assert fact in help_text, fact


# ----------------------------------------------------------------------------- tokenizer.json and prompt styles

@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny jaxlora checkpoint with a Llama 3-style tokenizer.json whose greedy answer to any prompt
    is two tokens a, b ("Hello world" or its start) then <|eot_id|>, again and again: every token's
    embedding is e0, except a's (e1) and b's (e2); the blocks add nothing; the head maps e0 -> a,
    e1 -> b, e2 -> <|eot_id|>. Its files are a base model's (EOS <|end_of_text|> only): only a chat
    style stops at <|eot_id|>. Returns (directory, the text of a and b)."""
    import flax.linen as nn
    import numpy as np
    from test_text_prompts import LLAMA3_TEMPLATE
    from test_text_tokenizer import train_byte_level, write_model_files
    specials = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    tok = train_byte_level(320, specials)
    (hello, world), eot = tok.encode("Hello world").ids[:2], tok.token_to_id("<|eot_id|>")
    config = LLaMAConfig(block_size=256, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_embd=16)
    shapes = nn.meta.unbox(LLaMA(config, None).init(jax.random.key(0), jax.numpy.zeros((1, 4), "int32"))["params"])
    params = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), shapes)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: np.ones_like(x) if "scale" in jax.tree_util.keystr(path) else x, params)
    wte, head = params["wte"]["embedding"], params["lm_head"]["kernel"]
    wte[:, 0], wte[hello], wte[world] = 1.0, np.eye(16)[1], np.eye(16)[2]
    head[0, hello], head[1, world], head[2, eot] = 10.0, 10.0, 10.0
    d = save_checkpoint(tmp_path_factory.mktemp("chat") / "model", config, None, params)
    tok.save(str(d / "tokenizer.json"))
    write_model_files(d, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                          "chat_template": LLAMA3_TEMPLATE}, {"eos_token_id": tok.token_to_id("<|end_of_text|>")})
    return d, tok.decode([hello, world])


def test_llama3_chat_stops_at_eot_id(capsys, chat_model):
    chat_model, answer = chat_model
    base = [*GREEDY, "--checkpoint_dir", str(chat_model), "--prompt", "Say hello."]
    rc, out, err = run(capsys, *base, "--prompt_style", "llama3-chat")
    assert rc == 0, err
    assert out == answer + "\n", out  # stopped at <|eot_id|>, which is not the tokenizer's EOS
    assert f"tokenizer {chat_model / 'tokenizer.json'}" in err and "prompt style: llama3-chat" in err, err
    rc, plain, err = run(capsys, *base, "--prompt_style", "plain")
    assert rc == 0 and plain.startswith(f"{answer}<|eot_id|>{answer}"), plain  # plain stops at EOS only
    # auto: no adapters and the model ships a chat template (Meta's Llama 3 format): that template
    rc, auto, err = run(capsys, *base)
    assert rc == 0 and auto == out, err
    assert "prompt style: chat-template (the model ships a chat template" in err, err


def test_a_style_the_tokenizer_cannot_write_is_refused(capsys):
    rc, _, err = run(capsys, "--prompt_style", "llama3-chat", "--tokenizer_path", str(DEMO_DIR / "tokenizer.model"))
    assert rc == 2 and "llama3-chat needs the special tokens" in err and "tokenizer.model" in err, err
