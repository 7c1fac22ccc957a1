"""train.py --init_adapters: a run starts from given adapters (a jaxlora adapters directory or a
PEFT LoRA folder) instead of fresh ones, takes their rank, alpha and targets, and refuses settings or
a base model they do not fit, by name."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from test_train import tiny_args

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.errors import CheckpointError
from jaxlora.model.layouts import init_adapters
from jaxlora.model.llama import LLaMA
from jaxlora.train import loop as trainer
from jaxlora.train.settings import TrainArgs, resolve_args
from jaxlora.weights.hf_files import save_peft_adapters
from jaxlora.weights.jaxlora_dir import save_checkpoint

LORA = LoRAConfig(r=4, alpha=8.0, targets=("q", "k", "v", "o", "up"))
FREE = dict(lora_r=None, lora_alpha=None, lora_targets=None)  # taken from the adapters


def random_adapters(config: LLaMAConfig, lora: LoRAConfig, seed: int) -> dict:
    """Adapters with random non-zero A and B (fresh ones have B = 0)."""
    fresh = init_adapters(LLaMA(config, lora), jax.random.key(seed))
    return jax.tree.map(lambda x: np.asarray(x + 0.3 * jax.random.normal(jax.random.key(seed + 1), x.shape)), fresh)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[dict, dict]:
    """{"ours": adapters dir, "peft": PEFT folder, "other_size": adapters of another model} and the adapters."""
    d = tmp_path_factory.mktemp("init")
    config = LLaMAConfig.from_name("tiny")
    lora = random_adapters(config, LORA, 5)
    save_checkpoint(d / "ours", config, LORA, None, lora)
    save_peft_adapters(lora, config, LORA, d / "peft")
    other = LLaMAConfig.from_name("tiny", n_layer=config.n_layer + 1)
    save_checkpoint(d / "other_size", other, LORA, None, random_adapters(other, LORA, 7))
    return {k: str(d / k) for k in ("ours", "peft", "other_size")}, lora


@pytest.mark.parametrize("kind", ["ours", "peft"])
def test_a_run_starts_from_the_given_adapters(sources, tmp_path, kind):
    paths, lora = sources
    # learning rate 0: AdamW moves nothing, so the run ends where it started, bit for bit
    result = trainer.run(tiny_args(tmp_path / kind, init_adapters=paths[kind], learning_rate=0.0, max_steps=2, **FREE))
    from jaxlora.weights.jaxlora_dir import read_config
    assert read_config(result.adapters_dir)[1] == LoRAConfig(r=4, alpha=8.0, dropout=0.1, targets=LORA.targets)
    got, want = jax.tree.leaves(result.lora), jax.tree.leaves(lora)
    assert len(got) == len(want) and all(np.array_equal(np.asarray(a), b) for a, b in zip(got, want))
    if kind == "ours":  # ... and a real learning rate trains them from there, not from fresh ones
        moved = trainer.run(tiny_args(tmp_path / "lr", init_adapters=paths[kind], max_steps=2, **FREE)).lora
        change = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(jax.tree.leaves(moved), want))
        assert 0 < change < 0.1


def test_settings_come_from_the_adapters_and_disagreements_are_named(sources):
    paths, _ = sources
    a = resolve_args(TrainArgs(preset="tiny", pretrained_path="none", init_adapters=paths["peft"]))
    assert (a.lora_r, a.lora_alpha, a.lora_targets) == (4, 8.0, LORA.targets)
    same = resolve_args(TrainArgs(preset="tiny", pretrained_path="none", init_adapters=paths["ours"], lora_r=4,
                                  lora_alpha=8, lora_targets="up,o,q_proj,k,v"))
    assert same.lora_targets == LORA.targets
    with pytest.raises(ValueError, match=r"--lora_r 8 disagrees with --init_adapters .*ours, which has 4"):
        resolve_args(TrainArgs(preset="tiny", pretrained_path="none", init_adapters=paths["ours"], lora_r=8))
    with pytest.raises(ValueError, match=r"--lora_targets q,v disagrees with .* which has q,k,v,o,up"):
        resolve_args(TrainArgs(preset="tiny", pretrained_path="none", init_adapters=paths["peft"], lora_targets="q,v"))


def test_adapters_of_another_model_are_refused(sources, tmp_path):
    paths, _ = sources
    with pytest.raises(CheckpointError, match="other_size"):
        trainer.run(tiny_args(tmp_path / "x", init_adapters=paths["other_size"], max_steps=1, **FREE))
    with pytest.raises(CheckpointError, match="nowhere"):
        trainer.run(tiny_args(tmp_path / "y", init_adapters=str(tmp_path / "nowhere"), max_steps=1, **FREE))
