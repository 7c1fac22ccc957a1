"""Issue 18's two sides on one data set: bench/alpaca_profile.py gives the lengths bench/train_throughput.py
gave before the move, and the order train.py's Batcher visits samples in; the PyTorch peer
(bench/peft_alpaca_peer.py) pads and counts tokens as a hand count says, and runs end to end on CPU."""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from alpaca_profile import alpaca_lengths, alpaca_samples, batch_order

from jaxlora.train.data import Batcher


def test_profile_is_the_one_train_throughput_had():
    # Pinned from train_throughput.alpaca_lengths / alpaca_samples before they moved (commit 818eaa0).
    lengths = alpaca_lengths(2048, 0)
    assert lengths[:8].tolist() == [139, 120, 184, 137, 96, 391, 266, 218]
    assert (int(lengths.sum()), int(lengths.max()), int((lengths > 256).sum())) == (353227, 986, 307)
    other = alpaca_lengths(100, 3)
    assert other[:8].tolist() == [399, 31, 163, 95, 101, 115, 42, 114] and int(other.sum()) == 16302
    samples = alpaca_samples(64, 32000)
    digest = hashlib.sha256(b"".join(s["input_ids"].tobytes() for s in samples)).hexdigest()
    assert digest == "ebbe06f20322f6ec7f545bf182fa12b59c71a7ff8bdf4754c0b3bf383e111676"
    assert all(s["input_ids"].dtype == np.int32 and s["labels"] is s["input_ids"] for s in samples)
    import train_throughput
    assert train_throughput.alpaca_samples is alpaca_samples  # ours uses this module, not a copy


@pytest.mark.parametrize("n,batch,steps,seed", [(10, 4, 7, 0), (12, 8, 4, 3), (5, 5, 2, 1)])
def test_batch_order_is_the_batchers(n, batch, steps, seed):
    batcher = Batcher([{"input_ids": np.ones(3, np.int32)}] * n, batch, 1, 8, seed=seed)
    expected = np.stack([batcher.next_indices() for _ in range(steps)])
    np.testing.assert_array_equal(batch_order(n, batch, steps, seed), expected)


# ----------------------------------------------------------------------------- the PyTorch peer

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")
import peft_alpaca_peer as peer


def hand_samples(lengths):
    return [{"input_ids": np.arange(1, n + 1, dtype=np.int32), "labels": np.arange(1, n + 1, dtype=np.int32)}
            for n in lengths]


@pytest.mark.parametrize("multiple,widths", [(1, [5, 8, 7, 6]), (3, [6, 8, 8, 6]), (64, [8, 8, 8, 8])])
def test_micro_batches_pad_to_their_longest_and_count_real_tokens(multiple, widths):
    samples = hand_samples([5, 3, 9, 2, 7, 1, 4, 6])  # max_seq_length 8 cuts the 9
    steps = peer.plan(samples, np.array([[0, 1, 2, 3], [4, 5, 6, 7]]), 2, 8, multiple)
    mbs = [mb for step in steps for mb in step]
    assert [len(step) for step in steps] == [2, 2]
    assert [mb.real for mb in mbs] == [8, 10, 8, 10]  # 5+3, 8+2, 7+1, 4+6
    assert [tuple(mb.ids.shape) for mb in mbs] == [(2, w) for w in widths]
    assert [mb.padded for mb in mbs] == [2 * w for w in widths]
    second = mbs[1]  # samples 2 (cut to 8) and 3
    assert second.ids[0].tolist()[:8] == list(range(1, 9)) and second.ids[1].tolist() == [1, 2] + [0] * (widths[1] - 2)
    assert second.labels[1].tolist() == [1, 2] + [-100] * (widths[1] - 2)
    assert int((mbs[0].labels != -100).sum()) == mbs[0].real


def test_plan_refuses_a_batch_that_micro_batches_do_not_divide():
    with pytest.raises(ValueError, match="not a multiple"):
        peer.plan(hand_samples([4, 4, 4]), np.array([[0, 1, 2]]), 2, 8, 1)


def test_masked_loss_skips_padding():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.tensor([[3, 4, 5, -100, -100, -100], [1, 2, 3, 4, 5, 6]])
    # by hand: position t predicts labels[t + 1]; row 0 has 2 targets, row 1 has 5
    terms = [-torch.log_softmax(logits[r, t], -1)[labels[r, t + 1]] for r in range(2) for t in range(5)
             if labels[r, t + 1] != -100]
    assert len(terms) == 7
    assert math.isclose(peer.masked_loss(logits, labels).item(), torch.stack(terms).mean().item(), rel_tol=1e-6)
    logits[0, 3:] = 1e4  # what padding's logits hold must not matter
    assert math.isclose(peer.masked_loss(logits, labels).item(), torch.stack(terms).mean().item(), rel_tol=1e-6)


def test_build_gives_a_bf16_base_and_lora_on_q_v_only():
    model = peer.build("tiny", torch.device("cpu"))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 2 * peer.PRESETS["tiny"][0]  # A and B on q and v, every layer
    assert all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in trainable)
    assert {p.dtype for n, p in model.named_parameters() if n not in trainable} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # the build put the default back


def test_cli_end_to_end_counts_the_batchers_tokens(capsys):
    n, batch, micro, warmup, steps, seq, multiple = 20, 8, 4, 1, 2, 128, 64  # 24 samples visited: past one epoch
    row = peer.main(["--device", "cpu", "--preset", "tiny", "--alpaca", str(n), "--batch", str(batch),
                     "--micro_batch", str(micro), "--steps", str(steps), "--warmup", str(warmup),
                     "--max_seq_length", str(seq), "--pad_multiple", str(multiple)])
    out = capsys.readouterr().out
    assert json.loads(next(line for line in out.splitlines() if line.startswith("{"))) == row
    assert "error" not in row, row
    # Independent counts: train.py's Batcher's real tokens of the timed steps, and the padding by hand.
    samples = alpaca_samples(n, peer.PRESETS["tiny"][5], 0)
    batcher = Batcher(samples, batch, micro, seq, seed=0)
    timed = [next(batcher) for _ in range(warmup + steps)][warmup:]
    assert row["real_tokens"] == sum(int(b["tokens"]) for b in timed)
    full = alpaca_lengths(n, 0)
    assert (full[np.concatenate([b["index"].ravel() for b in timed])] > seq).any()  # the cut is counted too
    lengths = np.minimum(full, seq)
    padded = sum(micro * min(-(-lengths[m].max() // multiple) * multiple, seq) for b in timed for m in b["index"])
    assert row["padded_tokens"] == padded and row["real_tokens"] < padded
    assert math.isclose(row["padding_fraction"], 1 - row["real_tokens"] / padded, abs_tol=1e-4)
    assert row["real_tokens_per_s"] > 0 and math.isclose(
        row["padded_tokens_per_s"] / row["real_tokens_per_s"], padded / row["real_tokens"], rel_tol=1e-2)
    assert 1 <= row["shapes"] <= seq // multiple and row["graphs_compiled"] == 0  # eager: nothing compiled
    assert math.isfinite(row["loss"]) and row["loss"] > 0
    assert row["trainable"] == 2 * 8 * (2 * 128 + 128 + 64)  # layers x r x (q: in+out, v: in+out)
    assert out.rstrip().splitlines()[-1].startswith("peft-alpaca ")  # the table comes last


def test_peer_does_not_import_jax():
    code = "import sys; sys.path.insert(0, 'bench'); import peft_alpaca_peer; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "False"
