"""The training loop: gradient accumulation, resume, bad input, non-finite loss, the demo, the CLI.

Most runs use the 'tiny' preset (random frozen weights), a 128-piece tokenizer trained by the
test and a few dozen records written by the test, so each run takes seconds on a CPU.
"""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlora.config import ADAPTERS_DIR, LIT_LORA_FILE, LLaMAConfig, LoRAConfig
from jaxlora.demo import DEMO_BASE
from jaxlora.errors import DataError, InputsError, NonFiniteLossError, TrainingError
from jaxlora.model.layouts import init_variables
from jaxlora.model.llama import LLaMA
from jaxlora.text.prompts import generate_prompt, get_style
from jaxlora.text.tokenizer import open_tokenizer
from jaxlora.train import loop as trainer
from jaxlora.train.build import fit_micro_batch
from jaxlora.train.data import Batcher
from jaxlora.train.inputs import load_data
from jaxlora.train.loop import TrainArgs
from jaxlora.train.optim import make_optimizer
from jaxlora.train.steps import init_train_state, make_train_step

ROOT = Path(__file__).resolve().parent.parent

# Many short runs compile the same programs (each run jits fresh closures): conftest.py's
# persistent compilation cache turns the repeats into cache hits.
WORDS = ("apple table river planet garden window yellow purple orange silver forest winter summer castle dragon "
         "pencil rocket bottle candle basket").split()


# ----------------------------------------------------------------------------- shared small setup

def small_records() -> list[dict]:
    recs = [{"instruction": "Reverse the word.", "input": w, "output": w[::-1]} for w in WORDS[:12]]
    recs += [{"instruction": f"Write {w} in uppercase.", "input": "", "output": w.upper()} for w in WORDS[8:]]
    return recs  # 24 records: 16 train + 8 validation below


@functools.lru_cache(maxsize=None)
def small_assets() -> dict[str, str]:
    """A 128-piece tokenizer and a JSON data file, in a directory shared by the test session."""
    from jaxlora.text.tokenizer import Tokenizer
    d = Path(tempfile.mkdtemp(prefix="jaxlora-train-test-"))
    recs = small_records()
    (d / "data.json").write_text(json.dumps(recs))
    (d / "text.txt").write_text("\n".join(generate_prompt(r) + r["output"] for r in recs))
    tok = Tokenizer.train(d / "text.txt", d, vocab_size=128, byte_fallback=False, model_type="bpe",
                          normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    return {"dir": str(d), "tokenizer": str(tok), "data": str(d / "data.json")}


def tiny_args(out_dir: str | os.PathLike, **overrides) -> TrainArgs:
    """A fast run: tiny preset, random base, 2 x 2 accumulation, dropout on, crosses an epoch at step 4."""
    assets = small_assets()
    values = dict(preset="tiny", pretrained_path="none", tokenizer_path=assets["tokenizer"], data_path=assets["data"],
                  out_dir=str(out_dir), lora_r=4, lora_alpha=8.0, lora_dropout=0.1, lora_targets="q,v",
                  learning_rate=1e-2, warmup_steps=2, batch_size=4, micro_batch_size=2, max_steps=6,
                  max_seq_length=96, eval_interval=3, eval_iters=2, save_interval=3, val_size=8,
                  precision="32-true", exact_match_samples=0, num_samples=0, max_new_tokens=4,
                  sample_instruction="", scan_unroll=1, progress=False, verbose=False, plot=False, export_lit=False,
                  packing=True)  # the packed loop end to end (the demo profile runs unpacked)
    values.update(overrides)
    return TrainArgs(**values)


@functools.lru_cache(maxsize=None)
def reference_run() -> trainer.TrainResult:
    """6 uninterrupted steps of tiny_args (checkpoints at 3 and 6)."""
    return trainer.run(tiny_args(Path(tempfile.mkdtemp(prefix="jaxlora-ref-")) / "out"))


def torch_load_numpy(path) -> dict:
    """Read a .pth with torch itself (independent of our reader) into numpy."""
    import torch

    from jaxlora.weights.torch_io import tensor_to_numpy
    return {k: tensor_to_numpy(v) for k, v in torch.load(path, weights_only=True).items()}


def assert_trees_equal(a, b) -> None:
    """Bit-identical leaves."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- gradient accumulation

def test_gradient_accumulation_matches_one_big_batch():
    """4 micro-batches of 2 accumulate to the same update as one batch of 8, with unequal token counts.

    Tolerance: float32; only the order of the sums differs, so the losses agree to 1e-6
    relative and the updated adapters to rtol 1e-5 / atol 1e-7 (SGD, whose update is the
    gradient itself) and atol 1e-6 (AdamW, lr 1e-2: its first update is ~lr * sign(g)).
    """
    config = LLaMAConfig.from_name("tiny")
    model = LLaMA(config, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q", "v")))
    variables = init_variables(model, jax.random.key(0))
    # Non-zero B, so every adapter leaf (A too) gets a gradient.
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), variables["lora"])
    params = variables["params"]

    T = 24
    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, (8, T)).astype(np.int32)
    valid = [24, 3, 17, 9, 24, 5, 12, 20]  # micro-batches of 2 hold 27, 26, 29, 32 label tokens
    labels = ids.copy()
    for row, n in enumerate(valid):
        labels[row, n:] = -1
        ids[row, n:] = 0
    labels[0, :6] = -1  # a masked prompt
    full = {"input_ids": jnp.asarray(ids[None]), "labels": jnp.asarray(labels[None])}
    micro = {"input_ids": jnp.asarray(ids.reshape(4, 2, T)), "labels": jnp.asarray(labels.reshape(4, 2, T))}

    for optimizer, atol in ((optax.sgd(0.5), 1e-7), (make_optimizer(1e-2), 1e-6)):
        step = make_train_step(model, optimizer, donate=False)
        state = init_train_state(lora, optimizer, seed=0)
        s_full, m_full = step(state, params, full)
        s_micro, m_micro = step(state, params, micro)
        assert int(m_full["tokens"]) == int(m_micro["tokens"]) == sum(valid) - 1 * 8 - 5
        np.testing.assert_allclose(float(m_micro["loss"]), float(m_full["loss"]), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(s_micro.lora), jax.tree.leaves(s_full.lora)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=atol)
        moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(s_full.lora), jax.tree.leaves(lora)))
        assert moved > 100 * atol  # the update is far larger than the tolerance

    # The test has teeth: averaging the four micro-batch means would give another loss.
    step = make_train_step(model, optax.sgd(0.5), donate=False)
    state = init_train_state(lora, optax.sgd(0.5), seed=0)
    means = [float(step(state, params, {k: v[i:i + 1] for k, v in micro.items()})[1]["loss"]) for i in range(4)]
    assert abs(np.mean(means) - float(m_full["loss"])) > 1e-3


# ----------------------------------------------------------------------------- resume

def test_resume_is_bit_identical(tmp_path):
    """6 steps in one run == 3 steps, then --resume for 3 more (dropout on, accumulation, an epoch boundary)."""
    ref = reference_run()
    first = trainer.run(tiny_args(tmp_path / "out", max_steps=3))
    assert first.step == 3
    resumed = trainer.run(tiny_args(tmp_path / "out", max_steps=6, resume=True))
    assert resumed.step == 6
    assert_trees_equal(resumed.lora, ref.lora)
    assert resumed.val_loss_after == ref.val_loss_after
    assert resumed.val_loss_before == ref.val_loss_before  # carried in the checkpoint
    # metrics.jsonl of the resumed run has one train line per step, as the uninterrupted one.
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (Path(ref.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == list(range(1, 7))
    assert [r["loss"] for r in rows if r["type"] == "train"] == [r["loss"] for r in ref_rows if r["type"] == "train"]


# ----------------------------------------------------------------------------- speed

def test_printed_speed_counts_the_batches_real_tokens_and_leaves_out_the_warmup_step():
    """tokens/s = the batches' non-padding tokens (counted here from their segment ids) over the
    timed steps' seconds; the first step after compiling is timed but not counted (the
    benchmark's warm-up); the printed line says the same numbers."""
    ref = reference_run()
    a = trainer.resolve_args(tiny_args(ref.out_dir))
    tokenizer = open_tokenizer(a.tokenizer_path)
    train, _ = load_data(a, tokenizer, get_style(a.prompt_style, tokenizer), lambda msg: None)
    shards = jax.device_count()  # the default layout: data parallel over every device
    batcher = Batcher(train, a.batch_size, fit_micro_batch(a.batch_size, a.micro_batch_size, shards, print) * shards,
                      a.max_seq_length, seed=a.seed, packing=True, shards=shards)
    real = [int((next(batcher)["segment_ids"] > 0).sum()) for _ in range(ref.step)]
    rows = [json.loads(line) for line in (Path(ref.out_dir) / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["type"] == "train"]
    assert [r["tokens"] for r in train_rows] == real
    assert [r.get("warmup", False) for r in train_rows] == [True] + [False] * (ref.step - 1)
    assert (ref.timed_steps, ref.warmup_steps) == (ref.step - 1, 1)
    timed = train_rows[1:]
    seconds = sum(r["seconds"] for r in timed)  # each rounded to 0.1 ms
    assert ref.train_seconds == pytest.approx(seconds, abs=0.01)
    assert ref.tokens_per_second == pytest.approx(sum(real[1:]) / seconds, rel=0.01)
    assert ref.padded_tokens_per_second == pytest.approx(sum(r["padded_tokens"] for r in timed) / seconds, rel=0.01)
    assert ref.mfu is None  # no known peak for a CPU
    speed = next(line for line in trainer.report(ref).splitlines() if line.startswith("speed"))
    assert (f"{ref.tokens_per_second:,.0f} real tokens/s, {ref.padded_tokens_per_second:,.0f} with padding over "
            f"{ref.step - 1} steps ({ref.train_seconds:.1f}s; the first step after each of 1 compilation not "
            "counted)") in speed, speed


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    trainer.run(tiny_args(tmp_path / "out", max_steps=1, save_interval=1))
    with pytest.raises(TrainingError, match="--resume"):
        trainer.run(tiny_args(tmp_path / "out", max_steps=2))


def test_resume_with_other_settings_names_the_key(tmp_path):
    trainer.run(tiny_args(tmp_path / "out", max_steps=1, save_interval=1))
    with pytest.raises(Exception, match=r"lora_r=4.*lora_r=2"):
        trainer.run(tiny_args(tmp_path / "out", max_steps=2, lora_r=2, resume=True))


# ----------------------------------------------------------------------------- non-finite loss

def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from jaxlora.train import build as run_module
    real = run_module.make_train_step

    def poisoned(model, optimizer, **kw):
        step = real(model, optimizer, **kw)

        def lower(*args):  # the trainer compiles ahead of time: poison the compiled step
            compiled = step.lower(*args).compile()

            def wrapped(state, params, batch):
                new, metrics = compiled(state, params, batch)
                if int(new.step) == 3:  # step 3 "diverges"
                    metrics = {**metrics, "loss": jnp.float32(jnp.nan)}
                return new, metrics
            return SimpleNamespace(compile=lambda: wrapped)
        return SimpleNamespace(lower=lower)

    monkeypatch.setattr(run_module, "make_train_step", poisoned)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteLossError, match=r"step 3.*Last good checkpoint: step 2"):
        trainer.run(tiny_args(out, save_interval=2))
    from jaxlora.train.checkpoints import Checkpointer
    assert Checkpointer(out / "checkpoints").all_steps() == [2]
    monkeypatch.setattr(run_module, "make_train_step", real)
    resumed = trainer.run(tiny_args(out, save_interval=2, resume=True))  # continues from step 2
    assert resumed.step == 6
    assert_trees_equal(resumed.lora, reference_run().lora)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("content, pattern", [
    ('[{"instruction": "a", "output": "b"},\n{"instruction": "c"', r"bad\.json: malformed JSON at line 2"),
    ('[{"instruction": "a", "output": "b"}, {"instruction": "c", "input": ""}]', r"bad\.json: record 1 has no 'output'"),
    ("[]", r"bad\.json: the data set is empty"),
])
def test_bad_data_is_a_clear_error(tmp_path, content, pattern):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(DataError, match=pattern):
        trainer.run(tiny_args(tmp_path / "out", data_path=str(tmp_path / "bad.json")))
    assert not (tmp_path / "out").exists()  # outputs only once the inputs are valid


def test_every_missing_input_is_reported_at_once_and_nothing_is_written(tmp_path):
    args = tiny_args(tmp_path / "out", tokenizer_path=str(tmp_path / "tokenizer.model"),
                     data_path=str(tmp_path / "alpaca.json"), pretrained_path=str(tmp_path / "7B" / "lit-llama.pth"))
    with pytest.raises(InputsError) as info:
        trainer.run(args)
    message = str(info.value)
    assert message.startswith("3 input(s) missing")
    for flag, how in (("--tokenizer_path", "tokenizer.model"), ("--data_path", "alpaca_data_cleaned.json"),
                      ("--pretrained_path", "convert/from_lit_llama.py")):
        assert flag in message and how in message, message
    assert not (tmp_path / "out").exists()


def test_cut_samples_are_counted_and_empty_steps_warned(tmp_path, capsys):
    """At 24 tokens every prompt fills the window: the run says how many samples are cut, that
    they have nothing to learn from, and warns at each step that had no loss token."""
    trainer.run(tiny_args(tmp_path / "out", max_seq_length=24, max_steps=2, verbose=True))
    out = capsys.readouterr().out
    assert re.search(r"data: \d+ of 24 samples are longer than --max_seq_length 24 and are cut", out), out
    assert re.search(r"warning: \d+ samples have no response token left", out), out
    assert "warning: step 1 had no loss tokens" in out and "warning: step 2 had no loss tokens" in out


def test_ctrl_c_saves_the_step_in_flight_and_resume_repeats_none(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from jaxlora.train import build as run_module
    from jaxlora.train.checkpoints import Checkpointer
    real = run_module.make_train_step

    def interrupted(model, optimizer, **kw):
        step = real(model, optimizer, **kw)

        def lower(*args):
            compiled = step.lower(*args).compile()

            def wrapped(state, params, batch):
                if int(state.step) == 4:  # Ctrl-C while step 5 is being queued
                    raise KeyboardInterrupt
                return compiled(state, params, batch)
            return SimpleNamespace(compile=lambda: wrapped)
        return SimpleNamespace(lower=lower)

    monkeypatch.setattr(run_module, "make_train_step", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        trainer.run(tiny_args(out))
    assert Checkpointer(out / "checkpoints").all_steps() == [3, 4]  # save_interval 3, and the step in hand
    monkeypatch.setattr(run_module, "make_train_step", real)
    resumed = trainer.run(tiny_args(out, resume=True))
    assert resumed.step == 6
    assert_trees_equal(resumed.lora, reference_run().lora)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == list(range(1, 7))  # no step twice


def test_tokenizer_that_is_not_sentencepiece(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match=r"not a SentencePiece model: .*tokenizer\.model"):
        trainer.run(tiny_args(tmp_path / "out", tokenizer_path=str(tmp_path / "tokenizer.model")))


def test_base_checkpoint_that_does_not_match_the_preset(tmp_path):
    pytest.importorskip("torch")
    from jaxlora.weights.lit_files import save_lit_base
    config = LLaMAConfig.from_name("tiny")
    params = init_variables(LLaMA(config), jax.random.key(0))["params"]
    save_lit_base(params, config, tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match=r"tiny\.pth: key 'transformer\.wte\.weight' has shape \(128, 64\), expected "
                                         r"\(1024, 128\).*in all 17 wrong shapes, 14 missing and 0 unexpected keys.* do not fit preset 'demo' "
                                         r"\(n_layer=4, n_embd=128"):
        trainer.run(tiny_args(tmp_path / "out", preset="demo", pretrained_path=str(tmp_path / "tiny.pth")))


def test_jaxlora_checkpoint_that_does_not_match_the_preset(tmp_path):
    from jaxlora.weights import jaxlora_dir as checkpoint_io
    config = LLaMAConfig.from_name("tiny")
    params = init_variables(LLaMA(config), jax.random.key(0))["params"]
    checkpoint_io.save_checkpoint(tmp_path / "base", config, None, params)
    with pytest.raises(ValueError, match=r"base/config\.json: does not match preset 'demo' \(.*n_embd: checkpoint "
                                         r"has 64, preset demo has 128"):
        trainer.run(tiny_args(tmp_path / "out", preset="demo", pretrained_path=str(tmp_path / "base")))
    # ... and the matching preset trains from it.
    result = trainer.run(tiny_args(tmp_path / "out2", pretrained_path=str(tmp_path / "base"), max_steps=1))
    assert result.step == 1


def test_cli_reports_bad_data_and_exits_nonzero(tmp_path):
    assets = small_assets()
    (tmp_path / "bad.json").write_text('[{"instruction": "a"}]')
    proc = subprocess.run([sys.executable, "train.py", "--preset", "tiny", "--pretrained_path", "none",
                           "--tokenizer_path", assets["tokenizer"], "--data_path", str(tmp_path / "bad.json"),
                           "--out_dir", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error:" in proc.stderr and "bad.json: record 0 has no 'output' field" in proc.stderr


# ----------------------------------------------------------------------------- the CLI

def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "JAXLORA_COMPILE_CACHE": ""}  # conftest.py's session cache, not ~/.cache/jaxlora


def test_help_documents_every_flag():
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr
    for flag in ("--preset", "--lora_r", "--lora_alpha", "--lora_dropout", "--lora_targets", "--learning_rate",
                 "--weight_decay", "--warmup_steps", "--batch_size", "--micro_batch_size", "--max_steps", "--epochs",
                 "--max_seq_length", "--eval_interval", "--eval_iters", "--save_interval", "--data_path",
                 "--pretrained_path", "--tokenizer_path", "--out_dir", "--resume", "--seed", "--precision",
                 "--mask_inputs", "--grad_clip", "--schedule"):
        assert flag in proc.stdout, flag
    assert "lit-llama" in proc.stdout and "3e-4" in proc.stdout.replace("0.0003", "3e-4")


def test_profiles_follow_the_preset():
    lit = trainer.resolve_args(TrainArgs(preset="7b"))
    assert (lit.learning_rate, lit.batch_size, lit.micro_batch_size, lit.warmup_steps, lit.max_seq_length,
            lit.lora_r, lit.lora_alpha, lit.lora_dropout, lit.weight_decay, lit.eval_interval, lit.save_interval,
            lit.precision) == (3e-4, 128, 4, 100, 256, 8, 16.0, 0.05, 0.01, 100, 100, "bf16-true")
    assert lit.pretrained_path == "checkpoints/lit-llama/7B/lit-llama.pth"
    demo = trainer.resolve_args(TrainArgs())
    assert demo.preset == "demo" and Path(demo.data_path).is_file() and Path(demo.tokenizer_path).is_file()
    relative = os.path.relpath(demo.pretrained_path)  # the demo's base named another way is still the demo
    assert trainer.resolve_args(TrainArgs(pretrained_path=relative)).mask_inputs == demo.mask_inputs is True
    assert trainer.resolve_args(TrainArgs(preset="13B", learning_rate=1e-4)).learning_rate == 1e-4
    with pytest.raises(ValueError, match="multiple"):
        trainer.resolve_args(TrainArgs(batch_size=10, micro_batch_size=4))


def test_run_writes_metrics_plot_and_lit_lora(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    result = trainer.run(tiny_args(out, max_steps=2, plot=True, export_lit=True, exact_match_samples=4,
                                   num_samples=2, sample_instruction="Reverse the word apple."))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2]
    assert {"loss", "lr", "tokens", "grad_norm"} <= set(rows[1])
    assert [r["step"] for r in rows if r["type"] == "eval"] == [0, 2]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "summary.json").read_text())["step"] == 2
    assert len(result.samples_before) == len(result.samples_after) == 2
    sd = torch_load_numpy(out / LIT_LORA_FILE)
    assert sorted(sd)[0] == "transformer.h.0.attn.c_attn.lora_A" and sd["transformer.h.0.attn.c_attn.lora_B"].shape == (128, 4)


def test_adapters_dir_gives_a_merged_export_for_any_targets(tmp_path):
    """o/MLP adapters have no lit-llama LoRA file; the run's adapters/ + the base -> merged .pth."""
    pytest.importorskip("torch")
    from test_convert import run_clis

    from jaxlora.model.lora import merge_lora
    from jaxlora.weights import jaxlora_dir as cio
    from jaxlora.weights import lit_llama
    config = LLaMAConfig.from_name("tiny")
    base = init_variables(LLaMA(config), jax.random.key(5))["params"]
    cio.save_checkpoint(tmp_path / "base", config, None, base)
    out = tmp_path / "out"
    result = trainer.run(tiny_args(out, max_steps=2, pretrained_path=str(tmp_path / "base"),
                                   lora_targets="q,o,down", export_lit=True, scan_layers=False))
    assert result.lit_lora_path is None and result.adapters_dir == str(out / ADAPTERS_DIR)
    assert cio.is_adapters_dir(out / "adapters") and cio.read_base(out / "adapters") == str(tmp_path / "base")
    merged_pth = tmp_path / "merged.pth"
    # Adapters for another model are refused, naming both directories (checked below; run alongside).
    other = init_variables(LLaMA(LLaMAConfig.from_name("tiny", n_layer=3)), jax.random.key(0))["params"]
    cio.save_checkpoint(tmp_path / "base3", LLaMAConfig.from_name("tiny", n_layer=3), None, other)
    rc, refused = run_clis(("convert/to_lit_llama.py", "--checkpoint_dir", str(tmp_path / "base"), "--adapters",
                            str(out / "adapters"), "--merged", "--out", str(merged_pth), "--quiet"),
                           ("convert/to_lit_llama.py", "--checkpoint_dir", str(tmp_path / "base3"), "--adapters",
                            str(out / "adapters"), "--merged", "--out", str(tmp_path / "x.pth"), "--quiet"))
    assert rc.returncode == 0, rc.stderr
    lora_config = LoRAConfig(r=4, alpha=8.0, targets=("q", "o", "down"))
    want = merge_lora(base, result.lora, lora_config)
    got = lit_llama.lit_to_params(torch_load_numpy(merged_pth), config)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    assert not np.allclose(got["h"]["mlp"]["c_proj"]["kernel"], base["h"]["mlp"]["c_proj"]["kernel"])  # merged
    assert refused.returncode == 2 and "adapters for another model than" in refused.stderr and \
        "n_layer: adapters 2, base 3" in refused.stderr, refused.stderr
    assert not (tmp_path / "x.pth").exists()


# ----------------------------------------------------------------------------- the built-in demo

def test_demo_training_lowers_val_loss_and_improves_exact_match(tmp_path):
    """A shortened built-in demo (shipped base, tokenizer and data; fewer steps and prompts)."""
    pytest.importorskip("torch")
    if not DEMO_BASE.is_file():
        pytest.fail(f"{DEMO_BASE} is missing: run scripts/pretrain_demo_base.py")
    # 100 steps (measured: val loss 2.03 -> 0.85, exact match 3% -> 31%, the same 10 of 32 as at 120 steps)
    result = trainer.run(TrainArgs(out_dir=str(tmp_path / "demo"), max_steps=100, exact_match_samples=32,
                                   eval_interval=1000, save_interval=1000, progress=False, verbose=False, plot=False))
    assert result.val_loss_after < result.val_loss_before - 0.2, (result.val_loss_before, result.val_loss_after)
    assert result.exact_match_after >= result.exact_match_before + 0.2, (result.exact_match_before,
                                                                         result.exact_match_after)
