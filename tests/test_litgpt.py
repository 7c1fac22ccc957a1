"""litgpt checkpoints both ways (issue 17), against litgpt's own classes: its `GPT` and
`litgpt.lora.GPT` built from its `Config` (LLaMA-style: RMSNorm, LLaMAMLP, grouped-query
attention with 2 query groups, rope_base 500000, Llama 3's rope_adjustments), saved as litgpt
saves them (lit_model.pth, save_config's model_config.yaml, {"model": ...} lit_model.pth.lora
with hyperparameters.yaml). Logits compared in float32 at <= 1e-5 of their scale; LoRA
tensors come back bit for bit; litgpt loads our exports with load_state_dict(strict=True).
"""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import asdict
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("litgpt", reason="litgpt is the reference here (.ci/run installs it: "
                                     "pip install litgpt && pip install 'huggingface-hub>=1.31')")
import litgpt.lora  # noqa: E402
from litgpt.config import Config  # noqa: E402
from litgpt.model import GPT  # noqa: E402
from litgpt.utils import incremental_save, save_config  # noqa: E402
from test_hf import TOKENS, close, random_adapters  # noqa: E402

from jaxlora.config import ALL_TARGETS, LITGPT_LORA_DIR, LLaMAConfig, LoRAConfig  # noqa: E402
from jaxlora.errors import CheckpointError, LitgptConfigError  # noqa: E402
from jaxlora.model.llama import LLaMA  # noqa: E402
from jaxlora.train.exports import RUN_OUTPUTS, export_litgpt  # noqa: E402
from jaxlora.weights import jaxlora_dir as cio  # noqa: E402
from jaxlora.weights import litgpt as lg  # noqa: E402
from jaxlora.weights.hf_files import model_config_of  # noqa: E402
from jaxlora.weights.litgpt_files import (  # noqa: E402
    adapters_to_litgpt,
    is_litgpt_dir,
    read_litgpt_config,
)
from jaxlora.weights.load import load_base_model, load_checkpoint, read_base_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# head size 32 and an original context of 64: llama3 scaling keeps, blends and divides frequencies
SHAPE = dict(name="tiny-llama3", block_size=64, n_layer=2, n_embd=128, n_head=4, n_query_groups=2, vocab_size=96,
             padded_vocab_size=96, intermediate_size=160, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
             parallel_residual=False, bias=False, rotary_percentage=1.0, rope_base=500000, norm_eps=1e-5,
             rope_adjustments=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=64))
SWITCHES = {"all": dict(lora_query=True, lora_key=True, lora_value=True, lora_projection=True, lora_mlp=True),
            "q,v": dict(lora_query=True, lora_value=True)}


def randomize(model, seed: int, only: str = "") -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only in name:
                unit = name.endswith(("norm_1.weight", "norm_2.weight", "ln_f.weight"))
                p.copy_((1.0 if unit else 0.0) + 0.1 * torch.randn(p.shape, generator=g))


def logits_of(model) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(TOKENS)).numpy()


_FORWARDS: dict = {}


def our_logits(config: LLaMAConfig, variables: dict, lora: LoRAConfig | None = None) -> np.ndarray:
    """Our model's logits of TOKENS, compiled once per (config, lora) in this file (each compile
    costs about as much as one eager call; most models here run several times)."""
    if (config, lora) not in _FORWARDS:
        _FORWARDS[config, lora] = jax.jit(LLaMA(config, lora, attention="xla").apply)
    host = jax.tree.map(np.asarray, variables)  # numpy and device arrays would compile apart
    return np.asarray(_FORWARDS[config, lora](host, TOKENS))


def convert(script: str, *args) -> None:
    """Run convert/{script}.py's main (on sys.path through test_hf)."""
    module = __import__(script)
    assert module.main([str(a) for a in args] + ["--quiet"]) == 0


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(litgpt directory, its GPT's logits), saved as `litgpt download` leaves one (with a
    SentencePiece tokenizer standing in)."""
    path = tmp_path_factory.mktemp("litgpt") / "tiny-llama3"
    path.mkdir()
    model = GPT(Config(**SHAPE))
    randomize(model, 0)
    with incremental_save(path / lg.BASE_FILE) as saver:  # as litgpt's convert_hf_checkpoint writes it
        saver.save({k: saver.store_early(v) for k, v in model.state_dict().items()})
    save_config(model.config, path)
    shutil.copyfile(ROOT / "jaxlora" / "demo" / "tokenizer.model", path / "tokenizer.model")
    (path / "tokenizer_config.json").write_text("{}")
    return path, logits_of(model)


@pytest.fixture(scope="module")
def converted(base, tmp_path_factory):
    """The jaxlora checkpoint of `base` (convert/from_litgpt.py): (dir, config, variables)."""
    out = tmp_path_factory.mktemp("jl") / "ck"
    convert("from_litgpt", "--checkpoint_dir", base[0], "--out_dir", out)
    return (out, *load_checkpoint(out)[::2])


def test_logits_equal_litgpt(base, converted):
    out, config, variables = converted
    assert (config.n_kv_head, config.rope_type, config.rope_base, config.rope_original_context) == \
        (2, "llama3", 500000.0, 64)
    close(our_logits(config, variables), base[1])
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer_config.json").is_file()


def test_export_loads_strictly_in_litgpt(base, converted, tmp_path):
    convert("to_litgpt", "--checkpoint_dir", converted[0], "--out_dir", tmp_path / "back", "--name", "tiny-llama3")
    model = GPT(Config.from_file(tmp_path / "back" / lg.MODEL_CONFIG))
    state = torch.load(tmp_path / "back" / lg.BASE_FILE)
    model.load_state_dict(state, strict=True)
    original = torch.load(base[0] / lg.BASE_FILE)
    assert list(state) == list(original) and all(torch.equal(state[k], original[k]) for k in original)
    np.testing.assert_array_equal(logits_of(model), base[1])
    assert read_litgpt_config(tmp_path / "back") == converted[1] == read_litgpt_config(base[0])
    assert (tmp_path / "back" / "tokenizer.model").is_file()
    assert __import__("to_litgpt").main(["--checkpoint_dir", str(converted[0]), "--out_dir", str(tmp_path / "x"),
                                         "--tokenizer_dir", str(tmp_path / "nowhere"), "--quiet"]) == 2


def test_pretrained_path_takes_a_litgpt_dir(base, converted):
    assert is_litgpt_dir(base[0]) and not is_litgpt_dir(converted[0])
    assert read_base_config(str(base[0]), None) == (converted[1], "litgpt")
    assert model_config_of(base[0]) == converted[1]  # from_peft's base of a run on a litgpt directory
    config, params, desc = load_base_model(str(base[0]), None, np.float32)
    assert config == converted[1] and desc.startswith("litgpt checkpoint")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(converted[2]["params"]))


def write_lora_dir(base_dir: Path, path: Path, switches: dict, seed: int = 1) -> tuple[Path, np.ndarray]:
    """A litgpt LoRA fine-tune's output (as finetune/lora.py saves it; bf16 adapters, non-zero A
    and B) and litgpt.lora.GPT's logits with it."""
    hparams = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0, **switches)
    model = litgpt.lora.GPT(litgpt.lora.Config.from_file(base_dir / lg.MODEL_CONFIG, **hparams))
    model.load_state_dict(torch.load(base_dir / lg.BASE_FILE), strict=False)
    randomize(model, seed, only="lora_")
    lora = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items() if "lora_" in k}
    model.load_state_dict(lora, strict=False)  # the bf16 values, back in float32
    path.mkdir()
    torch.save({"model": lora}, path / lg.LORA_FILE)
    for name in (lg.MODEL_CONFIG, "tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(base_dir / name, path / name)
    settings = {"checkpoint_dir": str(base_dir), "out_dir": str(path.parent), "precision": "bf16-true",
                "devices": 1, "train": {"epochs": 1}, **hparams}
    (path / lg.HYPERPARAMETERS).write_text(yaml.safe_dump(settings))
    return path, logits_of(model)


@pytest.mark.parametrize("switches", list(SWITCHES))
def test_lora_checkpoint_in_and_back_bit_exact(base, tmp_path, switches):
    lora_dir, logits = write_lora_dir(base[0], tmp_path / "final", SWITCHES[switches])
    convert("from_litgpt", "--checkpoint_dir", base[0], "--lora_dir", lora_dir, "--out_dir", tmp_path / "ck")
    config, lora_config, variables = load_checkpoint(tmp_path / "ck")
    assert lora_config == LoRAConfig(4, 8.0, 0.0, ALL_TARGETS if switches == "all" else ("q", "v"))
    close(our_logits(config, variables, lora_config), logits)
    # adapters alone, and back: the same tensors, dtypes and order; litgpt's switches and base
    convert("from_litgpt", "--lora_dir", lora_dir, "--out_dir", tmp_path / "adapters")
    assert cio.is_adapters_dir(tmp_path / "adapters") and cio.read_base(tmp_path / "adapters") == str(base[0])
    convert("to_litgpt", "--adapters", tmp_path / "adapters", "--lora", "--out_dir", tmp_path / "back")
    ours, theirs = (torch.load(d / lg.LORA_FILE) for d in (tmp_path / "back", lora_dir))
    assert list(ours) == ["model"] and list(ours["model"]) == list(theirs["model"])
    for key, tensor in theirs["model"].items():
        assert ours["model"][key].dtype == tensor.dtype and torch.equal(ours["model"][key], tensor), key
    hparams = yaml.safe_load((tmp_path / "back" / lg.HYPERPARAMETERS).read_text())
    wanted = yaml.safe_load((lora_dir / lg.HYPERPARAMETERS).read_text())
    assert {k: v for k, v in hparams.items() if k.startswith("lora_")} == \
        {k: wanted.get(k, False) for k in hparams if k.startswith("lora_")}
    assert (hparams["checkpoint_dir"], hparams["precision"]) == (str(base[0]), "bf16-true")


def test_a_litgpt_lora_directory_serves_as_adapters(base, converted, tmp_path):
    """generate.py --adapters and train.py --init_adapters take litgpt's finetune/lora.py output as it
    is (the loader they share, jaxlora.weights.load.load_adapters): the same adapters, bit for bit, as
    convert/from_litgpt.py makes of it, its settings, and its base from hyperparameters.yaml."""
    from jaxlora.infer.load import check_sources
    from jaxlora.train.settings import TrainArgs, resolve_args
    from jaxlora.weights.load import adapters_base, adapters_config, adapters_format, load_adapters, load_adapters_dir
    lora_dir, _ = write_lora_dir(base[0], tmp_path / "final", SWITCHES["all"])
    convert("from_litgpt", "--lora_dir", lora_dir, "--out_dir", tmp_path / "adapters")
    config = converted[1]
    assert adapters_format(lora_dir) == "litgpt" and adapters_format(tmp_path / "adapters") == "jaxlora"
    direct, via = load_adapters(lora_dir, config), load_adapters_dir(tmp_path / "adapters", config)
    assert direct[0] == via[0] == adapters_config(lora_dir) == LoRAConfig(4, 8.0, 0.0, ALL_TARGETS)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(direct[1]), jax.device_get(via[1]))
    assert adapters_base(lora_dir) == str(base[0])
    assert check_sources(adapters=lora_dir).pretrained_path == str(base[0])  # generate.py --adapters alone
    a = resolve_args(TrainArgs(pretrained_path=str(base[0]), init_adapters=str(lora_dir)))
    assert (a.lora_r, a.lora_alpha, a.lora_targets) == (4, 8.0, ALL_TARGETS)
    other = LLaMAConfig.from_name("tiny")
    with pytest.raises(CheckpointError, match="final"):
        load_adapters(lora_dir, other)


def test_litgpt_merges_our_lora_checkpoint(base, converted, tmp_path):
    """Our adapters (float32, all of litgpt's switches) as a litgpt LoRA checkpoint: litgpt's own
    merge_lora (what `litgpt chat` runs) folds them into a model with our logits."""
    from litgpt.scripts.merge_lora import merge_lora
    config = converted[1]
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=ALL_TARGETS)
    adapters = random_adapters(config, lora)
    cio.save_checkpoint(tmp_path / "adapters", config, lora, None, adapters, base=str(base[0]))
    convert("to_litgpt", "--adapters", tmp_path / "adapters", "--lora", "--out_dir", tmp_path / "final")
    merge_lora(tmp_path / "final")
    model = GPT(Config.from_file(tmp_path / "final" / lg.MODEL_CONFIG))
    model.load_state_dict(torch.load(tmp_path / "final" / lg.BASE_FILE), strict=True)
    close(logits_of(model), our_logits(config, {**converted[2], "lora": adapters}, lora))
    # train.py leaves the same as OUT_DIR/litgpt-lora when its base is a litgpt directory (only then)
    assert LITGPT_LORA_DIR in RUN_OUTPUTS  # --overwrite clears it
    said = []
    assert export_litgpt(tmp_path / "adapters", str(converted[0]), tmp_path / "none", said.append) is None
    run = export_litgpt(tmp_path / "adapters", str(base[0]), tmp_path / "run" / LITGPT_LORA_DIR, said.append)
    ours, cli = (torch.load(d / lg.LORA_FILE)["model"] for d in (run, tmp_path / "final"))
    assert list(ours) == list(cli) and all(torch.equal(ours[k], cli[k]) for k in cli) and str(run) in said[0]
    partial = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q", "gate"))
    cio.save_checkpoint(tmp_path / "partial", config, partial, None, random_adapters(config, partial))
    assert export_litgpt(tmp_path / "partial", str(base[0]), tmp_path / "p-out", said.append) is None
    assert "not written" in said[-1] and "lora_mlp" in said[-1] and not (tmp_path / "p-out").exists()


def test_merged_export_and_tied_embeddings(converted, tmp_path):
    out, config, variables = converted
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=ALL_TARGETS)  # any targets merge
    adapters = random_adapters(config, lora, seed=5)
    cio.save_checkpoint(tmp_path / "adapters", config, lora, None, adapters, base=str(out))
    convert("to_litgpt", "--checkpoint_dir", out, "--adapters", tmp_path / "adapters", "--merged",
            "--out_dir", tmp_path / "merged")
    model = GPT(Config.from_file(tmp_path / "merged" / lg.MODEL_CONFIG))
    model.load_state_dict(torch.load(tmp_path / "merged" / lg.BASE_FILE), strict=True)
    close(logits_of(model), our_logits(config, {**variables, "lora": adapters}, lora))
    # a tied model: litgpt's GPT has no tied head, so lm_head.weight is written as wte's copy
    tied = dataclasses.replace(config, tie_embeddings=True)
    params = {k: v for k, v in jax.device_get(variables["params"]).items() if k != "lm_head"}
    cio.save_checkpoint(tmp_path / "tied", tied, None, params)
    convert("to_litgpt", "--checkpoint_dir", tmp_path / "tied", "--out_dir", tmp_path / "tied-litgpt")
    model = GPT(Config.from_file(tmp_path / "tied-litgpt" / lg.MODEL_CONFIG))
    model.load_state_dict(torch.load(tmp_path / "tied-litgpt" / lg.BASE_FILE), strict=True)
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    logits = our_logits(tied, {"params": params})
    close(logits_of(model), logits)
    convert("from_litgpt", "--checkpoint_dir", tmp_path / "tied-litgpt", "--out_dir", tmp_path / "untied")
    back, _, again = load_checkpoint(tmp_path / "untied")
    assert back == config and not back.tie_embeddings
    close(our_logits(back, again), logits)


def legacy_qkv(w: torch.Tensor, config: Config) -> torch.Tensor:
    """lit-gpt's interleaved placement [q heads of a group, its k, its v] per query group (the
    inverse of litgpt's qkv_reassemble)."""
    q, k, v = w.split((config.n_head * config.head_size, *(2 * (config.n_query_groups * config.head_size,))))
    per = config.n_head // config.n_query_groups
    groups = [torch.cat((q.view(config.n_query_groups, per * config.head_size, -1)[g],
                         k.view(config.n_query_groups, config.head_size, -1)[g],
                         v.view(config.n_query_groups, config.head_size, -1)[g])) for g in range(config.n_query_groups)]
    return torch.cat(groups)


def test_legacy_interleaved_attn_attn(base, converted, tmp_path):
    """A lit-gpt checkpoint (before March 2024): litgpt's own GPT reads its attn.attn.weight
    (by qkv_reassemble) with the same logits, and so do we."""
    config = Config.from_file(base[0] / lg.MODEL_CONFIG)
    state = torch.load(base[0] / lg.BASE_FILE)
    legacy = {k.replace(".attn.qkv.", ".attn.attn."): legacy_qkv(v, config) if ".attn.qkv." in k else v
              for k, v in state.items()}
    path = tmp_path / "lit-gpt"
    shutil.copytree(base[0], path)
    torch.save(legacy, path / lg.BASE_FILE)
    model = GPT(config)
    model.load_state_dict(torch.load(path / lg.BASE_FILE), strict=True)
    np.testing.assert_array_equal(logits_of(model), base[1])
    convert("from_litgpt", "--checkpoint_dir", path, "--out_dir", tmp_path / "ck")
    config, _, variables = load_checkpoint(tmp_path / "ck")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables), jax.device_get(converted[2]))


def test_litgpt_named_configs():
    """litgpt's own configs of LLaMA-family models read as our presets; others are refused by key."""
    for name, preset in (("Llama-3.1-8B", "llama3.1-8b"), ("Llama-3.2-1B", "llama3.2-1b"),
                         ("Llama-2-7b-hf", "llama2-7b"), ("Mistral-7B-v0.3", "mistral-7b")):
        ours = lg.config_from_litgpt(asdict(Config.from_name(name)))
        # litgpt keeps a separate LM head (its HF converter copies a tied one into it)
        assert ours == dataclasses.replace(LLaMAConfig.from_name(preset), tie_embeddings=False), name
        assert lg.config_from_litgpt(lg.config_to_litgpt(ours)) == ours
        assert lg.config_from_litgpt(asdict(Config(**lg.config_to_litgpt(ours)))) == ours
    for name, key in (("pythia-14m", "norm_class_name='LayerNorm'"), ("phi-2", "parallel_residual=True"),
                      ("Gemma-2b", "mlp_class_name='GemmaMLP'"), ("Qwen2.5-0.5B", "attn_bias=True"),
                      ("Mistral-7B-v0.1", "sliding_window_size=4096")):
        with pytest.raises(LitgptConfigError, match="cannot convert") as e:
            lg.config_from_litgpt(asdict(Config.from_name(name)), name)
        assert key in str(e.value), str(e.value)


@pytest.mark.parametrize("changes, message", [
    (dict(norm_class_name="LayerNorm"), "norm_class_name='LayerNorm'"),
    (dict(parallel_residual=True), "parallel_residual=True"),
    (dict(bias=True), "bias=True"),
    (dict(rotary_percentage=0.5), "rotary_percentage=0.5"),
    (dict(rope_adjustments=dict(factor=2.0, beta_fast=32, beta_slow=1, original_max_seq_len=64)), "not YaRN"),
    (dict(some_new_switch=True), "some_new_switch=True"),
])
def test_non_llama_configs_refused_by_key(base, tmp_path, capsys, changes, message):
    from_litgpt = __import__("from_litgpt")
    path = tmp_path / "edited"
    shutil.copytree(base[0], path)
    raw = yaml.safe_load((path / lg.MODEL_CONFIG).read_text())
    (path / lg.MODEL_CONFIG).write_text(yaml.safe_dump({**raw, **changes}))
    assert from_litgpt.main(["--checkpoint_dir", str(path), "--out_dir", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and lg.MODEL_CONFIG in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_lora_settings_litgpt_cannot_express(base, tmp_path, capsys):
    with pytest.raises(LitgptConfigError, match="lora_head=true"):
        lg.lora_from_litgpt({"lora_r": 8, "lora_alpha": 16, "lora_query": True, "lora_head": True})
    with pytest.raises(LitgptConfigError, match="lora_mlp"):
        lg.lora_to_litgpt(LoRAConfig(targets=("q", "gate")))
    # lit_model.pth beside lit_model.pth.lora is litgpt's merge: taking it as the base would add the adapters twice
    lora_dir, _ = write_lora_dir(base[0], tmp_path / "final", SWITCHES["q,v"])
    shutil.copyfile(base[0] / lg.BASE_FILE, lora_dir / lg.BASE_FILE)
    assert __import__("from_litgpt").main(["--checkpoint_dir", str(lora_dir), "--lora_dir", str(lora_dir),
                             "--out_dir", str(tmp_path / "out"), "--quiet"]) == 2
    assert "would count twice" in capsys.readouterr().err
    config = read_litgpt_config(base[0])  # adapters recording no base: the litgpt base must be named
    cio.save_checkpoint(tmp_path / "ad", config, LoRAConfig(r=2), None, random_adapters(config, LoRAConfig(r=2)))
    with pytest.raises(CheckpointError, match="--base_dir"):
        adapters_to_litgpt(tmp_path / "ad", tmp_path / "lora-out")

