"""Hugging Face transformers / PEFT interop, checked against transformers and PEFT themselves.

A tiny random LlamaConfig (not a preset: vocab 96, hidden 64, 4 heads, 2 layers) saved by
`save_pretrained` (sharded); logits compared in float32 at <= 1e-5 relative.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.numpy import load_file  # noqa: E402

from jaxlora.config import ALL_TARGETS, LLaMAConfig, LoRAConfig  # noqa: E402
from jaxlora.errors import HFConfigError, StateDictError  # noqa: E402
from jaxlora.model.llama import LLaMA  # noqa: E402
from jaxlora.model.lora import merge_lora  # noqa: E402
from jaxlora.text.tokenizer import Tokenizer  # noqa: E402
from jaxlora.weights import hf  # noqa: E402
from jaxlora.weights import jaxlora_dir as cio  # noqa: E402
from jaxlora.weights.load import load_checkpoint  # noqa: E402
from jaxlora.weights.hf_files import (  # noqa: E402
    adapters_to_peft,
    checkpoint_to_hf,
    hf_to_checkpoint,
    is_hf_dir,
    load_hf,
    load_peft_adapters,
    peft_to_adapters,
    save_peft_adapters,
)

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "jaxlora" / "demo" / "tokenizer.model"
sys.path.insert(0, str(ROOT / "convert"))
HF_SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
TOKENS = np.array([[1, 5, 17, 33, 80, 2, 9, 64, 95, 40, 3, 11], [7, 7, 30, 60, 90, 12, 0, 45, 22, 18, 70, 4]])
RTOL = 1e-5


def close(ours, theirs) -> None:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    # <= 1e-5 relative to the logits' scale (elementwise relative error is meaningless near 0)
    assert np.max(np.abs(ours - theirs)) <= RTOL * np.max(np.abs(theirs)), np.max(np.abs(ours - theirs))


def randomize(module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.endswith("layernorm.weight") or name.endswith("norm.weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))


def hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(TOKENS)).logits.numpy()


def our_logits(config, variables, lora=None) -> np.ndarray:
    model = LLaMA(config, lora, attention="xla")
    return np.asarray(model.apply(variables, TOKENS))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A random LlamaForCausalLM saved in shards (several files and model.safetensors.index.json)."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_SHAPE)).eval()
    randomize(model, 0)
    path = tmp_path_factory.mktemp("hf") / "base"
    model.save_pretrained(path, max_shard_size="200KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def hf_model(path: Path, dtype=torch.float32):
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.fixture(scope="module")
def base(hf_dir):
    """(config, params) read by load_hf, and the HF model's logits."""
    config, _, variables = load_hf(hf_dir)
    return config, variables["params"], hf_logits(hf_model(hf_dir))


def random_adapters(config, lora: LoRAConfig, seed: int = 1) -> dict:
    """Our adapters with random non-zero A and B (shapes from the model)."""
    shapes = cio.expected_variables(config, lora)[cio.LORA_DIR]
    rng = np.random.default_rng(seed)
    return traverse_util.unflatten_dict({p: (0.1 * rng.standard_normal(s.shape)).astype(np.float32)
                                         for p, s in shapes.items()})


def test_hf_base_logits_and_checkpoint(hf_dir, base, tmp_path, monkeypatch):
    config, params, logits = base
    assert (config.n_embd, config.n_head, config.n_layer, config.padded_vocab_size) == (64, 4, 2, 96)
    assert is_hf_dir(hf_dir) and not is_hf_dir(tmp_path)
    close(our_logits(config, {"params": params}), logits)
    # the streaming converter's checkpoint holds the same tensors, bit for bit (wte and lm_head
    # moved in 6 blocks each under this chunk size)
    import from_hf
    monkeypatch.setattr(cio, "MAX_CHUNK_BYTES", 16 * 64 * 4)
    assert from_hf.main(["--hf_dir", str(hf_dir), "--out_dir", str(tmp_path / "ck"), "--quiet"]) == 0
    ck_config, _, variables = load_checkpoint(tmp_path / "ck")
    assert ck_config == config
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables["params"]), params)
    _, _, placed = load_hf(hf_dir, param_dtype="bfloat16", place=lambda leaf, path: jax.device_put(leaf))
    assert isinstance(placed["params"]["wte"]["embedding"], jax.Array)
    assert placed["params"]["wte"]["embedding"].dtype == "bfloat16"


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_bfloat16_read_bit_exact(hf_dir, base, tmp_path, weights):
    """bfloat16 weights (which numpy cannot hold natively) come through bit for bit, from
    safetensors and from pytorch_model.bin, and go back out to HF bit for bit."""
    model = hf_model(hf_dir).to(torch.bfloat16)
    path = tmp_path / "bf16"
    if weights == "bin":
        path.mkdir()
        shutil.copy(hf_dir / "config.json", path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    else:
        model.save_pretrained(path)
    config, _, variables = load_hf(path)
    bits = {k: v.view(torch.int16).numpy() for k, v in model.state_dict().items()}
    ours = variables["params"]
    assert ours["wte"]["embedding"].dtype == "bfloat16"
    np.testing.assert_array_equal(ours["wte"]["embedding"].view(np.int16), bits["model.embed_tokens.weight"])
    np.testing.assert_array_equal(ours["h"]["mlp"]["c_proj"]["kernel"][1].T.view(np.int16),
                                  bits["model.layers.1.mlp.down_proj.weight"])
    cio.save_checkpoint(tmp_path / "ck", config, None, ours)
    checkpoint_to_hf(tmp_path / "ck", tmp_path / "back", progress=False)
    back = hf_model(tmp_path / "back", dtype="auto")  # config.json says bfloat16
    assert back.dtype == torch.bfloat16
    for k, v in back.state_dict().items():
        np.testing.assert_array_equal(v.view(torch.int16).numpy(), bits[k], err_msg=k)


@pytest.mark.parametrize("targets", [("q", "v"), ALL_TARGETS])
def test_our_adapters_load_in_peft(hf_dir, base, tmp_path, targets):
    config, params, _ = base
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=targets)
    adapters = random_adapters(config, lora)
    out = save_peft_adapters(adapters, config, lora, tmp_path / "peft", base_model_name_or_path=str(hf_dir))
    settings = json.loads((out / "adapter_config.json").read_text())
    assert settings["target_modules"] == [hf.HF_MODULES[t].split(".")[-1] for t in targets]
    model = peft.PeftModel.from_pretrained(hf_model(hf_dir), out).eval()
    # every adapter tensor of the PEFT model is the file's (no missing key left at its init, no
    # unexpected key: the key sets are equal)
    loaded = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(model).items()}
    stored = load_file(out / "adapter_model.safetensors")
    assert set(loaded) == set(stored)
    for k in stored:
        np.testing.assert_array_equal(loaded[k], stored[k])
    close(our_logits(config, {"params": params, "lora": adapters}, lora), hf_logits(model))


def make_peft(hf_dir: Path, path: Path, use_rslora: bool, seed: int = 3) -> Path:
    """A PEFT LoRA folder trained "elsewhere": PEFT's own model, random A and B."""
    lora = peft.LoraConfig(r=4, lora_alpha=6, lora_dropout=0.0, target_modules="all-linear", use_rslora=use_rslora,
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(hf_model(hf_dir), lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_round_trip(hf_dir, base, tmp_path, use_rslora):
    config, params, _ = base
    source = make_peft(hf_dir, tmp_path / "theirs", use_rslora)
    import from_peft
    import to_peft
    assert from_peft.main(["--peft_dir", str(source), "--out_dir", str(tmp_path / "ours"), "--base", str(hf_dir)]) == 0
    ck_config, lora = cio.read_config(tmp_path / "ours")
    assert ck_config == config and lora.targets == ALL_TARGETS
    # rsLoRA honoured on the way in: our logits are PEFT's
    _, adapters = load_peft_adapters(source, config)
    model = peft.PeftModel.from_pretrained(hf_model(hf_dir), source).eval()
    close(our_logits(config, {"params": params, "lora": adapters}, lora), hf_logits(model))
    # ... and on the way out: the same tensors bit for bit, the same settings
    args = ["--checkpoint_dir", str(tmp_path / "ours"), "--out_dir", str(tmp_path / "back")]
    assert to_peft.main(args + (["--use_rslora"] if use_rslora else [])) == 0
    before, after = load_file(source / "adapter_model.safetensors"), load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert set(before) == set(after)
    for k in before:
        assert before[k].dtype == after[k].dtype and before[k].tobytes() == after[k].tobytes(), k
    theirs, ours = (json.loads((d / "adapter_config.json").read_text()) for d in (source, tmp_path / "back"))
    for field in ("r", "lora_alpha", "use_rslora", "lora_dropout", "peft_type", "bias"):
        assert ours[field] == theirs[field], field
    # PEFT wrote "all-linear" out per layer (model.layers.0.self_attn.q_proj, ...); we write the names
    assert sorted(ours["target_modules"]) == sorted({m.split(".")[-1] for m in theirs["target_modules"]})
    assert ours["base_model_name_or_path"] == str(hf_dir)
    again = peft.PeftModel.from_pretrained(hf_model(hf_dir), tmp_path / "back").eval()
    close(hf_logits(again), our_logits(config, {"params": params, "lora": adapters}, lora))


def test_merged_hf_export(hf_dir, base, tmp_path):
    config, params, _ = base
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q", "k", "v", "o", "down"))
    adapters = random_adapters(config, lora, seed=5)
    cio.save_checkpoint(tmp_path / "ck", config, None, params)
    cio.save_checkpoint(tmp_path / "adapters", config, lora, None, adapters)
    import to_hf
    assert to_hf.main(["--checkpoint_dir", str(tmp_path / "ck"), "--adapters", str(tmp_path / "adapters"),
                       "--merged", "--out_dir", str(tmp_path / "merged"), "--max_shard_size", "150KB", "--quiet",
                       "--tokenizer_path", str(TOKENIZER)]) == 0
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    text = "Below is an instruction.\n\n### Response: 42"
    ids = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")(text)["input_ids"]
    assert ids == Tokenizer(TOKENIZER).encode(text, bos=True, eos=False).tolist()
    merged = merge_lora(params, adapters, lora)
    close(hf_logits(hf_model(tmp_path / "merged")), our_logits(config, {"params": merged}))
    # unmerged: the base itself, back to HF's tensors bit for bit (one file)
    checkpoint_to_hf(tmp_path / "ck", tmp_path / "plain", progress=False)
    theirs = {}
    for shard in hf_dir.glob("*.safetensors"):
        theirs.update(load_file(shard))
    ours = load_file(tmp_path / "plain" / "model.safetensors")
    assert set(ours) == set(theirs)
    for k in ours:
        assert ours[k].tobytes() == theirs[k].tobytes(), k


def test_config_translation():
    """Llama-2-7b-hf's config.json (transformers 4 form) is accepted; ours goes to HF and back."""
    llama2 = {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": 4096,
              "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama",
              "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1,
              "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
              "vocab_size": 32000}
    config = hf.config_from_hf(llama2)
    assert config == LLaMAConfig.from_name("7B", block_size=4096)
    assert hf.config_from_hf(hf.config_to_hf(config)) == config
    loaded = transformers.LlamaConfig(**hf.config_to_hf(config))
    assert hf.config_from_hf(loaded.to_dict()) == config


# ---------------------------------------------------------------------------------------------
# Bad input: each a clear error naming the file or field


def edited_hf_dir(hf_dir: Path, tmp: Path, **changes) -> Path:
    path = tmp / "edited"
    shutil.copytree(hf_dir, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


# GQA, linear/llama3 rope scaling, tied embeddings and any intermediate_size are supported now
# (tests/test_hf_llama3.py); what is still refused:
@pytest.mark.parametrize("changes, message", [
    (dict(num_key_value_heads=3), "n_kv_head=3 must divide n_head=4"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}), "rope scaling 'yarn'"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope scaling 'dynamic'"),
    (dict(model_type="mistral", sliding_window=4096), "sliding_window=4096"),
    (dict(head_dim=32), "head_dim 32"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_unsupported_hf_config_refused(hf_dir, tmp_path, changes, message):
    import from_hf
    path = edited_hf_dir(hf_dir, tmp_path, **changes)
    with pytest.raises(HFConfigError, match="config.json") as e:
        load_hf(path)
    assert message in str(e.value)
    assert from_hf.main(["--hf_dir", str(path), "--out_dir", str(tmp_path / "out"), "--quiet"]) == 2
    assert not (tmp_path / "out").exists()


def test_missing_shard_named(hf_dir, tmp_path, capsys):
    import from_hf
    path = edited_hf_dir(hf_dir, tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert from_hf.main(["--hf_dir", str(path), "--out_dir", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors.index.json" in err and shard.name in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting, message", [
    ({"use_dora": True}, "use_dora=True"), ({"bias": "all"}, "bias='all'"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens"), ({"peft_type": "IA3"}, "peft_type 'IA3'"),
])
def test_unsupported_peft_refused(hf_dir, tmp_path, setting, message, capsys):
    import from_peft
    source = tmp_path / "theirs"
    save_peft_adapters(random_adapters(load_hf(hf_dir)[0], LoRAConfig(r=2, targets=("q", "v"))),
                       load_hf(hf_dir)[0], LoRAConfig(r=2, targets=("q", "v")), source)
    settings = json.loads((source / "adapter_config.json").read_text())
    (source / "adapter_config.json").write_text(json.dumps({**settings, **setting}))
    assert from_peft.main(["--peft_dir", str(source), "--base", str(hf_dir), "--out_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "adapter_config.json" in err and message in err
    assert not (tmp_path / "o").exists()


def test_adapters_for_another_model_size(hf_dir, base, tmp_path, capsys):
    config, _, _ = base
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**HF_SHAPE, "hidden_size": 128,
                                                                      "intermediate_size": 512}))
    other.save_pretrained(tmp_path / "other")
    lora = LoRAConfig(r=2, targets=("q", "v"))
    save_peft_adapters(random_adapters(config, lora), config, lora, tmp_path / "peft")
    with pytest.raises(StateDictError, match=r"q_proj.lora_A.weight' has shape \(2, 64\), expected \(2, 128\)"):
        peft_to_adapters(tmp_path / "peft", tmp_path / "o", base=tmp_path / "other")
    assert not (tmp_path / "o").exists()
    # and our adapters dir for one model given with a checkpoint of another
    hf_to_checkpoint(tmp_path / "other", tmp_path / "other_ck", progress=False)
    cio.save_checkpoint(tmp_path / "adapters", config, lora, None, random_adapters(config, lora))
    import to_hf
    assert to_hf.main(["--checkpoint_dir", str(tmp_path / "other_ck"), "--adapters", str(tmp_path / "adapters"),
                       "--merged", "--out_dir", str(tmp_path / "m"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "adapters for another model" in err and "n_embd: adapters 64, base 128" in err
    adapters_to_peft(tmp_path / "adapters", tmp_path / "p2")  # its own size is fine


def test_train_on_an_hf_base_leaves_a_peft_folder(tmp_path):
    """train.py's run on an HF directory: weights read by load_hf, adapters also written as
    OUT_DIR/peft, which PEFT loads onto the same HF base with our trained model's logits."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_train import small_assets, tiny_args

    from jaxlora.train import loop as trainer
    from jaxlora.weights.load import load_adapters_dir
    vocab = Tokenizer(small_assets()["tokenizer"]).vocab_size
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**HF_SHAPE, "vocab_size": vocab})).eval()
    randomize(model, 5)
    model.save_pretrained(tmp_path / "hf")
    result = trainer.run(tiny_args(tmp_path / "out", preset=None, pretrained_path=str(tmp_path / "hf"), max_steps=2))
    assert result.peft_dir == str(tmp_path / "out" / "peft")
    settings = json.loads((tmp_path / "out" / "peft" / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == str((tmp_path / "hf").absolute())
    peft_model = peft.PeftModel.from_pretrained(hf_model(tmp_path / "hf"), tmp_path / "out" / "peft").eval()
    config, _, variables = load_hf(tmp_path / "hf")
    lora_config, lora = load_adapters_dir(tmp_path / "out" / "adapters", config, "the HF base")
    assert np.abs(np.asarray(jax.tree.leaves(lora)[0])).max() > 0
    close(our_logits(config, {"params": variables["params"], "lora": lora}, lora_config), hf_logits(peft_model))


def test_llama1_ports_norm_epsilon(hf_dir, tmp_path):
    """HF ports of LLaMA-1 and OpenLLaMA use rms_norm_eps 1e-6: read into config.norm_eps, the
    logits are HF's (the tiny model's activations are small enough for eps to matter: checked
    by the 1e-5 model's logits differing), and to_hf writes it back."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**HF_SHAPE, "rms_norm_eps": 1e-6})).eval()
    randomize(model, 0)
    with torch.no_grad():  # shrink the activations so that eps shows in the output
        model.model.embed_tokens.weight.mul_(1e-3)
    model.save_pretrained(tmp_path / "hf")
    config, _, variables = load_hf(tmp_path / "hf")
    assert config.norm_eps == 1e-6
    want = hf_logits(model)
    close(our_logits(config, variables), want)
    other = np.asarray(our_logits(dataclasses.replace(config, norm_eps=1e-5), variables))
    assert np.max(np.abs(other - want)) > 100 * RTOL * np.max(np.abs(want))
    assert hf.config_to_hf(config)["rms_norm_eps"] == 1e-6


def test_rope_base_is_read(hf_dir, tmp_path):
    """CodeLlama's rope_theta 1e6 (transformers 5 writes it under rope_parameters): read into
    config.rope_base; the logits are HF's and visibly not those of base 10000."""
    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**HF_SHAPE, **rope, "rope_theta": 1e6})).eval()
    randomize(model, 0)
    model.save_pretrained(tmp_path / "hf")
    config, _, variables = load_hf(tmp_path / "hf")
    assert config.rope_base == 1e6
    want = hf_logits(model)
    close(our_logits(config, variables), want)
    other = np.asarray(our_logits(dataclasses.replace(config, rope_base=10000.0), variables))
    assert np.max(np.abs(other - want)) > 100 * RTOL * np.max(np.abs(want))
    assert hf.config_to_hf(config)["rope_theta"] == 1e6
