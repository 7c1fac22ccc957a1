"""Sequence packing: the packer, packed batches, and a packed batch computing what its samples
compute one by one (losses, gradients, logits), for every attention implementation on CPU."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.model.layouts import init_variables
from jaxlora.model.llama import LLaMA
from jaxlora.train.data import IGNORE_INDEX, Batcher, pack_rows
from jaxlora.train.steps import init_train_state, make_loss_fn, make_train_step

# float32 on CPU: a packed row sums its attention and loss in another order and shape than the
# samples alone; measured differences are ~1e-7 relative, the bound is 1e-5 (losses) / 1e-4 (grads).
RTOL, GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-4, 1e-6
# the implementations that run on CPU (Pallas kernels through their interpreter); splash's losses and
# gradients on packed rows: tests/test_attention_impls.py (the model-level test below passes with
# ("splash", 2) too, measured 2026-12-02, but costs ~13 s of CI)
IMPLS = ("xla", "pallas", "splash")


def _samples(n: int, seed: int = 0, low: int = 3, high: int = 30, vocab: int = 128) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(1, vocab, size=int(rng.integers(low, high)), dtype=np.int32)
        labels = ids.copy()
        labels[: len(ids) // 3] = IGNORE_INDEX  # a masked prompt
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_first_fit_decreasing_fills_rows_deterministically():
    lengths = [5, 9, 2, 7, 3, 10, 1]
    rows = pack_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert rows == [[5], [1, 6], [3, 4], [0, 2]]  # longest first, each into the first row with room
    assert rows == pack_rows(lengths, 10)
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([11], 10)


@pytest.mark.parametrize("shards", [1, 2])
def test_packed_batches_hold_the_unpacked_samples_with_restarting_positions(shards):
    samples = _samples(40, high=40)
    plain = Batcher(samples, 16, 4, 32, seed=3)
    packed = Batcher(samples, 16, 4, 32, seed=3, packing=True, shards=shards)
    for _ in range(5):
        a, b = next(plain), next(packed)
        np.testing.assert_array_equal(a["index"], b["index"])  # the same samples, step by step
        assert int(a["tokens"]) == int(b["tokens"])
        assert b["input_ids"].shape == (4, 4, 32)
        ids, seg, pos = (b[k].reshape(16, 32) for k in ("input_ids", "segment_ids", "positions"))
        found = []
        for row in range(16):
            for s in range(1, seg[row].max() + 1):
                where = np.flatnonzero(seg[row] == s)
                assert np.array_equal(pos[row, where], np.arange(len(where)))
                found.append(tuple(ids[row, where]))
        want = [tuple(samples[i]["input_ids"][:32]) for i in a["index"].reshape(-1)]
        assert sorted(found) == sorted(want)
        used = int(b["used_micro"])
        assert not seg.reshape(4, 4, 32)[used:].any() and seg.reshape(4, 4, 32)[used - 1].any()
        assert int(b["padded"]) == used * 4 * 32


def test_each_shard_packs_its_own_samples():
    samples = _samples(32, seed=1)
    plain = next(Batcher(samples, 16, 4, 64, seed=0))
    packed = next(Batcher(samples, 16, 4, 64, seed=0, packing=True, shards=2))
    for shard in range(2):  # rows [2 * shard, 2 * shard + 2) of each micro-batch
        cols = slice(2 * shard, 2 * shard + 2)
        mine = {tuple(samples[i]["input_ids"]) for i in plain["index"][:, cols].reshape(-1)}
        ids, seg = packed["input_ids"][:, cols].reshape(-1, 64), packed["segment_ids"][:, cols].reshape(-1, 64)
        got = {tuple(ids[r][seg[r] == s]) for r in range(len(ids)) for s in range(1, seg[r].max() + 1)}
        assert got == mine


def test_packed_batcher_resumes_exactly():
    samples = _samples(23, seed=2)
    whole = Batcher(samples, 8, 4, 48, seed=5, packing=True)
    batches = [next(whole) for _ in range(7)]
    first = Batcher(samples, 8, 4, 48, seed=5, packing=True)
    for _ in range(3):
        next(first)
    resumed = Batcher(samples, 8, 4, 48, seed=5, packing=True, state=first.state())
    for want in batches[3:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


# --------------------------------------------------------------------------- the model on packed rows


def _model(impl: str, n_kv_head: int = 4) -> tuple[LLaMA, dict, dict]:
    config = LLaMAConfig(block_size=64, vocab_size=128, padded_vocab_size=128, n_layer=1, n_head=4, n_embd=64,
                         n_kv_head=n_kv_head, intermediate_size=128)
    model = LLaMA(config, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q", "v")), attention=impl)
    variables = init_variables(model, jax.random.key(0))
    leaves, tree = jax.tree.flatten(variables["lora"])  # B != 0, so every adapter has a gradient
    keys = jax.random.split(jax.random.key(1), len(leaves))
    lora = jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return model, variables["params"], lora


def _one_row(samples: list[dict], length: int = 64) -> dict:
    batch = next(Batcher(samples, len(samples), len(samples), length, packing=True))
    assert batch["segment_ids"][0, 0].max() == len(samples)  # all in the first row
    return {k: jnp.asarray(batch[k][0, :1]) for k in ("input_ids", "labels", "segment_ids", "positions")}


def _only(row: dict, segment: int) -> jax.Array:
    """The row's labels for one sample (the others ignored)."""
    return jnp.where(row["segment_ids"] == segment, row["labels"], IGNORE_INDEX)


def _segment_of(row: dict, sample: dict) -> int:
    """The segment of the row that holds `sample` (the packer lays samples out longest first)."""
    ids, seg = np.asarray(row["input_ids"][0]), np.asarray(row["segment_ids"][0])
    found = [s for s in range(1, seg.max() + 1) if np.array_equal(ids[seg == s], sample["input_ids"])]
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("impl, n_kv_head", [("xla", 4), ("xla", 2), ("pallas", 2)])  # 2: grouped k/v
def test_packed_row_gives_each_samples_loss_and_gradient(impl, n_kv_head):
    model, params, lora = _model(impl, n_kv_head)
    samples = _samples(3, seed=4, low=13, high=14)  # one length: one compile alone
    row = _one_row(samples)
    loss_sum = make_loss_fn(model)
    grad = jax.jit(jax.value_and_grad(loss_sum, has_aux=True))
    total = 0.0
    for sample in samples:
        s = _segment_of(row, sample)
        (packed, n_packed), g_packed = grad(lora, params, row["input_ids"], _only(row, s), None,
                                            row["segment_ids"], row["positions"])
        (alone, n_alone), g_alone = grad(lora, params, jnp.asarray(sample["input_ids"])[None],
                                         jnp.asarray(sample["labels"])[None], None)
        assert int(n_packed) == int(n_alone) > 0
        np.testing.assert_allclose(float(packed), float(alone), rtol=RTOL)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=GRAD_RTOL, atol=GRAD_ATOL), g_packed, g_alone)
        total += float(alone)
    (whole, _), _ = grad(lora, params, row["input_ids"], row["labels"], None, row["segment_ids"], row["positions"])
    np.testing.assert_allclose(float(whole), total, rtol=RTOL)  # no target crosses a boundary


@pytest.mark.parametrize("impl", IMPLS)
def test_no_token_attends_across_a_sample_boundary(impl):
    model, params, lora = _model(impl)
    samples = _samples(3, seed=6, low=12, high=20)
    changed = [dict(s) for s in samples]
    changed[1] = {**samples[1], "input_ids": (samples[1]["input_ids"] * 7 + 3) % 127 + 1}
    apply = jax.jit(lambda r: model.apply({"params": params, "lora": lora}, r["input_ids"],
                                          positions=r["positions"], segment_ids=r["segment_ids"]))
    a, b = _one_row(samples), _one_row(changed)
    np.testing.assert_array_equal(a["segment_ids"], b["segment_ids"])  # the same layout
    la, lb = np.asarray(apply(a)), np.asarray(apply(b))
    seg = np.asarray(a["segment_ids"][0])
    where = np.flatnonzero(np.asarray(a["input_ids"][0]) != np.asarray(b["input_ids"][0]))
    moved = seg[where[0]]  # the changed sample's segment, wherever the packer put it
    others = (seg != 0) & (seg != moved)
    assert others.any() and np.all(seg[where] == moved)
    np.testing.assert_array_equal(la[0, others], lb[0, others])
    assert not np.allclose(la[0, seg == moved], lb[0, seg == moved])


def test_packed_train_step_equals_unpacked_and_skips_empty_micro_batches():
    model, params, lora = _model("xla")
    samples = _samples(8, seed=7, low=5, high=14)
    optimizer = optax.adamw(1e-2)
    step = make_train_step(model, optimizer, donate=False)
    plain = next(Batcher(samples, 8, 2, 64, seed=1))
    packed = next(Batcher(samples, 8, 2, 64, seed=1, packing=True))
    assert int(packed["used_micro"]) == 1 < plain["input_ids"].shape[0]
    state = init_train_state(lora, optimizer)
    s1, m1 = step(state, params, {k: jnp.asarray(plain[k]) for k in ("input_ids", "labels")})
    keys = ("input_ids", "labels", "segment_ids", "positions")
    s2, m2 = step(state, params, {k: jnp.asarray(packed[k]) for k in keys})
    assert int(m1["tokens"]) == int(m2["tokens"])
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=RTOL)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=GRAD_RTOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=GRAD_RTOL, atol=GRAD_ATOL), s2.lora, s1.lora)
