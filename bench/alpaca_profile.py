"""Instruction-like training data with Alpaca's length profile, shared by both sides of the issue-18
comparison: bench/train_throughput.py --alpaca (ours) and bench/peft_alpaca_peer.py (PyTorch).

numpy only, on purpose: the PyTorch peer imports it, and importing JAX there would take 75% of the
GPU's memory before PyTorch starts.
"""
from __future__ import annotations

import numpy as np


def alpaca_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Token counts with Alpaca's profile (prompt + response, LLaMA tokenizer): a log-normal body
    with a median near 130 (most samples 50-300 tokens), and one sample in 20 from a tail up to
    1,000 tokens."""
    rng = np.random.default_rng(seed)
    body = rng.lognormal(np.log(130.0), 0.55, size=n)
    tail = rng.uniform(300, 1000, size=n)
    lengths = np.where(rng.random(n) < 0.05, tail, body)
    return np.clip(lengths, 20, 1000).astype(int)


def alpaca_samples(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Random token samples of `alpaca_lengths` (labels = inputs: loss on every token); ids from 1,
    since 0 is the padding id."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for length in alpaca_lengths(n, seed):
        ids = rng.integers(1, vocab, size=length, dtype=np.int32)
        out.append({"input_ids": ids, "labels": ids})
    return out


def batch_order(n: int, batch_size: int, steps: int, seed: int = 0) -> np.ndarray:
    """(steps, batch_size) sample indices in the order train.py's Batcher (jaxlora.train.data) visits
    them: epoch e is a permutation drawn from default_rng([seed, e]), and a batch that outruns an
    epoch continues into the next one's order (tests/test_alpaca_peer.py holds the two equal)."""
    need = batch_size * steps
    epochs = -(-need // n)
    order = np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in range(epochs)])
    return order[:need].reshape(steps, batch_size)
