"""The modern LLaMA family against transformers and PEFT themselves (issue 17): grouped-query
and multi-query attention, llama3 and linear RoPE scaling, tied embeddings, an MLP width of
its own, Mistral. Tiny random models written with transformers' own classes, read through
weights/hf.py's mapping (load_hf); logits compared in float32 at <= 1e-5 of their scale.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from jaxlora.config import ALL_TARGETS, LLaMAConfig, LoRAConfig  # noqa: E402
from jaxlora.errors import HFConfigError, StateDictError  # noqa: E402
from jaxlora.model.layouts import init_variables  # noqa: E402
from jaxlora.model.llama import LLaMA, init_cache  # noqa: E402
from jaxlora.weights import hf, lit_llama  # noqa: E402
from jaxlora.weights.hf_files import load_hf, save_peft_adapters  # noqa: E402

from test_hf import TOKENS, close, hf_logits, our_logits, random_adapters, randomize  # noqa: E402

# hidden 128 / 4 heads: head size 32, so that llama3 scaling with an original context of 64
# has high (kept), medium (blended) and low (divided) frequencies at base 500000.
SHAPE = dict(vocab_size=96, hidden_size=128, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}
CASES = {
    "llama3": ("llama", dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False)),
    "tied": ("llama", dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    "multi-query": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=False)),
    "linear": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})),
    "mistral": ("mistral", dict(num_key_value_heads=2, sliding_window=None, rope_theta=1e6,
                                tie_word_embeddings=False)),
}
CLASSES = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}


def write_model(kind: str, settings: dict, path: Path) -> Path:
    config_cls, model_cls = CLASSES[kind]
    model = model_cls(config_cls(**{**SHAPE, **settings})).eval()
    randomize(model, 0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """name -> (HF dir, our config, our params, HF logits)."""
    out = {}
    for name, (kind, settings) in CASES.items():
        path = write_model(kind, settings, tmp_path_factory.mktemp(name))
        config, _, variables = load_hf(path)
        model = CLASSES[kind][1].from_pretrained(path, dtype=torch.float32).eval()
        out[name] = (path, config, variables["params"], hf_logits(model))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_logits_equal_transformers(models, name):
    path, config, params, logits = models[name]
    assert config.n_kv_head == CASES[name][1]["num_key_value_heads"] and config.n_hidden == 160
    close(our_logits(config, {"params": params}), logits)
    if config.rope_type != "default":  # the scaling is exercised: unscaled RoPE is far off
        plain = our_logits(dataclasses.replace(config, rope_type="default"), {"params": params})
        assert np.max(np.abs(plain - logits)) > 100 * 1e-5 * np.max(np.abs(logits))


def test_configs_read_as_meant(models):
    llama3, tied, mqa, linear, mistral = (models[n][1] for n in CASES)
    assert (llama3.rope_type, llama3.rope_factor, llama3.rope_base, llama3.rope_original_context) == \
        ("llama3", 8.0, 500000.0, 64)
    assert tied.tie_embeddings and "lm_head" not in models["tied"][2] and not llama3.tie_embeddings
    assert mqa.n_kv_head == 1 and (linear.rope_type, linear.rope_factor) == ("linear", 4.0)
    assert mistral.rope_base == 1e6 and mistral.n_kv_head == 2
    # ours -> HF config.json -> transformers -> ours again
    for config in (llama3, tied, mqa, linear, mistral):
        assert hf.config_from_hf(hf.config_to_hf(config)) == config
        loaded = transformers.LlamaConfig(**hf.config_to_hf(config))
        assert hf.config_from_hf(loaded.to_dict()) == config
    for name in ("7B", "llama2-70b", "llama3.1-8b", "llama3.2-1b", "mistral-7b"):
        preset = LLaMAConfig.from_name(name)
        assert hf.config_from_hf(hf.config_to_hf(preset)) == preset


def test_llama3_8b_preset_counts_and_cache():
    config = LLaMAConfig.from_name("llama3.1-8b")
    assert config.num_params() == 8_030_261_248  # Meta's model card: 8.03B
    assert LoRAConfig(r=8, targets=("q", "v")).num_params(config) == 3_407_872  # PEFT's count, r=8 on q, v
    cache = jax.eval_shape(lambda: init_cache(LLaMA(config), 1, 128))
    assert cache["k"].shape == (32, 1, 8, 128, 128)  # n_kv_head = 8: a quarter of MHA's cache
    assert LLaMAConfig.from_name("llama3.2-1b").num_params() == 1_235_814_400


def test_peft_adapters_on_all_targets_of_a_gqa_model(models, tmp_path):
    """Our adapters on all seven projections of a GQA model load in PeftModel with equal logits
    (q's lora_B is wider than k's and v's: only the leading columns of theirs are exported)."""
    path, config, params, _ = models["llama3"]
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=ALL_TARGETS)
    adapters = random_adapters(config, lora)
    out = save_peft_adapters(adapters, config, lora, tmp_path / "peft", base_model_name_or_path=str(path))
    base = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(base, out).eval()
    close(our_logits(config, {"params": params, "lora": adapters}, lora), hf_logits(model))
    state = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(model).items()}
    assert state["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"] == (2 * 32, 4)


def test_gqa_cached_decoding_equals_the_full_forward(models):
    _, config, params, _ = models["llama3"]
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q", "k", "v"))
    model = LLaMA(config, lora, attention="xla")
    variables = {"params": params, "lora": random_adapters(config, lora)}
    full = np.asarray(jax.jit(model.apply)(variables, TOKENS))
    logits, cache = jax.jit(lambda v, s: model.apply(v, s, cache=init_cache(model, 2, 16)))(variables, TOKENS[:, :5])
    assert cache["k"].shape == (config.n_layer, 2, 2, 16, config.head_size)
    # one program for every decoding step (eager apply would trace the layers anew at each)
    step = jax.jit(lambda v, tok, t, c: model.apply(v, tok, positions=jnp.full((2, 1), t), cache=c, cache_index=t,
                                                    kv_mask=jnp.broadcast_to(jnp.arange(16) <= t, (2, 16))))
    got = [np.asarray(logits)]
    for t in range(5, TOKENS.shape[1]):
        logits, cache = step(variables, TOKENS[:, t:t + 1], jnp.int32(t), cache)
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, rtol=1e-5, atol=1e-5)
    from jaxlora.infer.decode import greedy_generate
    tokens = greedy_generate(model, variables, [list(TOKENS[0, :4])], 4, eos_id=None)
    assert len(tokens[0]) == 4


@pytest.mark.parametrize("kv, tensor", [(2, 2), (1, 2), (2, 4)])
def test_split_qkv_run_layout_computes_the_same(kv, tensor, monkeypatch):
    """The tensor-parallel q/k/v run layout (query groups; k/v heads replicated when tensor does
    not divide n_kv_head) gives the stored layout's logits, adapters on q, k and v included."""
    from jaxlora.model import layouts
    from jaxlora.model.layouts import QKVLayout, layered, qkv_layout
    monkeypatch.setattr(layouts, "model_tensor", lambda model: tensor)  # the run layout of a tensor axis, no mesh
    config = LLaMAConfig(n_layer=1, n_head=4, n_kv_head=kv, n_embd=32, vocab_size=64, block_size=32)
    lora = LoRAConfig(r=2, alpha=4, dropout=0.0, targets=("q", "k", "v"))
    model = LLaMA(config, lora, attention="xla")
    variables = init_variables(model, jax.random.key(0))
    variables["lora"] = jax.tree.map(lambda x: x + 0.1, variables["lora"])  # B != 0
    want = model.apply(variables, TOKENS[:, :8] % 64)
    layout = qkv_layout(config, tensor)
    assert isinstance(layout, QKVLayout) and layout.run_kv == max(kv, tensor)
    split = model.clone(split_qkv=True)
    got = split.apply({k: layered(split, v) for k, v in variables.items()}, TOKENS[:, :8] % 64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    kernel = variables["params"]["h"]["attn"]["c_attn"]["kernel"]
    np.testing.assert_array_equal(layout.to_stored(layout.to_run(kernel)), kernel)


@pytest.mark.parametrize("changes, message", [
    (dict(sliding_window=4096), "sliding_window=4096"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope scaling 'dynamic'"),
    (dict(num_key_value_heads=3), "n_kv_head=3 must divide n_head=4"),
])
def test_unsupported_configs_named(changes, message):
    settings = {**SHAPE, "model_type": "mistral", "num_key_value_heads": 2, **changes}
    with pytest.raises(HFConfigError, match="config.json") as e:
        hf.config_from_hf(settings)
    assert message in str(e.value)


@pytest.mark.parametrize("name", ["llama3.1-8b", "llama3.2-1b", "llama2-70b"])
def test_lit_llama_files_refuse_modern_models(name):
    config = LLaMAConfig.from_name(name)
    with pytest.raises(StateDictError, match="lit-llama") as e:
        lit_llama.base_maps(config)
    assert "PEFT" in str(e.value) and "HF" in str(e.value)
    with pytest.raises(StateDictError, match="lit-llama"):
        lit_llama.lora_maps(config, LoRAConfig())
    lit_llama.base_maps(LLaMAConfig.from_name("llama2-7b"))  # LLaMA-1's architecture: fine


def test_old_config_json_still_loads():
    old = {"block_size": 2048, "vocab_size": 32000, "padded_vocab_size": 32000, "n_layer": 32, "n_head": 32,
           "n_embd": 4096, "norm_eps": 1e-5, "rope_base": 10000.0}
    config = LLaMAConfig.from_dict(old)
    assert config == LLaMAConfig.from_name("7B") and config.n_kv_head == 32 and config.n_hidden == 11008
    assert LLaMAConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_train_py_on_a_llama3_hf_directory_with_its_chat_template(tmp_path):
    """Issue 17 end to end: train.py on a tiny random Llama 3-style HF directory (GQA, llama3
    RoPE, a 128,256-id tokenizer.json with its chat template) trains with the chat template,
    evaluates, samples, and leaves a PEFT folder that PEFT loads onto that directory with our
    trained model's logits."""
    from test_hf import hf_model
    from test_text_prompts import LLAMA3_TEMPLATE
    from test_text_tokenizer import llama3_dir
    from test_train import tiny_args

    from jaxlora.train import loop as trainer
    from jaxlora.weights.load import load_adapters_dir
    hf_dir = llama3_dir(tmp_path / "hf", LLAMA3_TEMPLATE)
    kind, settings = CASES["llama3"]
    write_model(kind, {**settings, "vocab_size": 128_256}, hf_dir)
    result = trainer.run(tiny_args(tmp_path / "out", preset=None, pretrained_path=str(hf_dir), tokenizer_path=str(hf_dir),
                                   prompt_style="chat-template", mask_inputs=True, max_steps=2, eval_interval=1,
                                   sample_instruction="Reverse the word rocket.", max_new_tokens=3))
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2]
    evals = [r for r in rows if r["type"] == "eval"]
    assert evals and all(r["val_loss"] is not None and r["sample"] is not None for r in evals)
    peft_model = peft.PeftModel.from_pretrained(hf_model(hf_dir), result.peft_dir).eval()
    config, _, variables = load_hf(hf_dir)
    assert config.n_kv_head == 2 and config.rope_type == "llama3"
    lora_config, lora = load_adapters_dir(tmp_path / "out" / "adapters", config, "the HF base")
    close(our_logits(config, {"params": variables["params"], "lora": lora}, lora_config), hf_logits(peft_model))


def test_generate_py_reads_a_peft_folder(tmp_path, capsys):
    """generate.py --adapters takes a PEFT LoRA folder written by PEFT itself (all seven targets of a
    GQA Llama 3-style model) as it is: the same greedy answer as the folder converted with
    convert/from_peft.py; its base found from base_model_name_or_path when no base is given; the
    model's chat template chosen (and said why) since PEFT records no prompt format; a base PEFT
    names but that is not here is refused by name."""
    import sys

    from test_hf import make_peft
    from test_text_prompts import LLAMA3_TEMPLATE
    from test_text_tokenizer import llama3_dir

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import generate

    from jaxlora.weights.hf_files import peft_to_adapters
    hf_dir = llama3_dir(tmp_path / "hf", LLAMA3_TEMPLATE)
    kind, settings = CASES["llama3"]
    write_model(kind, {**settings, "vocab_size": 128_256}, hf_dir)
    theirs = make_peft(hf_dir, tmp_path / "peft", use_rslora=False)
    ours = peft_to_adapters(theirs, tmp_path / "ours", base=hf_dir)
    ask = ["--prompt", "Reverse the word rocket.", "--temperature", "0", "--max_new_tokens", "6"]

    def answer(*argv: str) -> tuple[str, str]:
        assert generate.main([*ask, *argv]) == 0
        out = capsys.readouterr()
        return out.out, out.err

    from_peft, err = answer("--pretrained_path", str(hf_dir), "--adapters", str(theirs))
    assert "PEFT adapters" in err and "PEFT adapters record no prompt format" in err and "chat template" in err
    chat = ["--prompt_style", "chat-template"]  # converted adapters default to Alpaca (train.py's)
    converted, _ = answer("--pretrained_path", str(hf_dir), "--adapters", str(ours), *chat)
    alone, _ = answer("--adapters", str(theirs))  # the base from adapter_config.json
    base_only, _ = answer("--pretrained_path", str(hf_dir), *chat)
    assert from_peft.strip() and from_peft == converted == alone
    assert from_peft != base_only  # the adapters change the answer
    config = json.loads((theirs / "adapter_config.json").read_text())
    (theirs / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "meta-llama/x"}))
    assert generate.main([*ask, "--adapters", str(theirs)]) != 0
    assert "'meta-llama/x' (adapter_config.json 'base_model_name_or_path') is not found" in capsys.readouterr().err
