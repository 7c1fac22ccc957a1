"""The PyTorch QLoRA peer (bench/peft_qlora_peer.py) end to end on CPU, tiny preset: bitsandbytes layers hold the
weights they were given, two PEFT training steps give a finite loss and move only the LoRA adapters."""
from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes", reason="the peer needs bitsandbytes (its CPU backend runs these tests)")
pytest.importorskip("peft")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("peft_qlora_peer", ROOT / "bench" / "peft_qlora_peer.py")
peer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peer)
CPU = torch.device("cpu")
T = TypeVar("T")
LAYER = {"nf4": "Linear4bit", "nf4-dq": "Linear4bit", "int8": "Linear8bitLt"}


def cpu_or_skip(fn: Callable[[], T], quant: str) -> T:
    """Run fn(); skip (saying which layer) where bitsandbytes' CPU backend lacks an op the layer needs."""
    try:
        return fn()
    except NotImplementedError as e:
        pytest.skip(f"bitsandbytes {bnb.__version__}'s CPU backend cannot run {LAYER[quant]} ({quant}): {e}")


def dequantized(layer: torch.nn.Module) -> torch.Tensor:
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return layer.weight.CB.float() * layer.weight.SCB.float()[:, None] / 127
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


@pytest.mark.parametrize("quant", peer.QUANTS)
def test_quantized_linear_holds_its_weights(quant):
    # Bounds: NF4's widest gap between codes is 0.304 of a block's absmax (-1 to -0.696), so a weight rounds by at
    # most 0.152 absmax, 0.16 with the absmax itself quantized (nf4-dq); int8 rounds by half a row's scale / 127.
    torch.manual_seed(0)
    w = (torch.randn(256, 128) * 0.02).to(torch.bfloat16)
    layer = cpu_or_skip(lambda: peer.quantized_linear(w, quant, 6.0), quant)
    assert type(layer).__name__ == LAYER[quant]
    if quant != "int8":
        assert layer.weight.quant_type == "nf4" and layer.weight.quant_state.nested == (quant == "nf4-dq")
        assert layer.weight.quant_state.blocksize == 64
        bound = 0.16 * w.float().reshape(-1, 64).abs().amax(1, keepdim=True).repeat(1, 64).reshape(w.shape)
    else:
        assert layer.weight.dtype == torch.int8
        bound = w.float().abs().amax(1, keepdim=True) / 254 + 1e-4  # + fp16 rounding of the scale
    err = (dequantized(layer) - w.float()).abs()
    assert (err <= bound).all(), f"{quant}: max error {err.max():.3g} over its bound"
    assert 0 < err.mean() < 0.2 * w.float().abs().mean()


@pytest.mark.parametrize("quant", ["nf4-dq", "int8"])
def test_two_cpu_steps_move_only_the_adapters(quant):
    torch.manual_seed(0)
    model, facts = cpu_or_skip(lambda: peer.build("tiny", quant, CPU, r=8), quant)
    assert facts["quantize_s"] > 0
    n_layer = peer.PRESETS["tiny"][0]
    bases = [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    assert len(bases) == 7 * n_layer  # every decoder linear is quantized
    assert not [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and "lora_" not in n
                and "lm_head" not in n]
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora) and len(lora) == 2 * 2 * n_layer  # A, B on q and v
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in lora)  # PEFT's fp32 adapters
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = peer.optimizer(model)
    x = torch.randint(0, peer.PRESETS["tiny"][5], (2, 32), generator=torch.Generator().manual_seed(1))
    model.train()
    losses = [cpu_or_skip(lambda: peer.train_step(model, opt, x).item(), quant) for _ in range(2)]
    assert all(math.isfinite(v) and v > 0 for v in losses), losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == lora, f"changed: {sorted(changed ^ lora)[:4]}"


def test_cli_rows_and_table(capsys):
    rows = cpu_or_skip(lambda: peer.main(["--device", "cpu", "--preset", "TINY", "--shapes", "1x32", "--quant", "nf4",
                                          "--steps", "1", "--warmup", "0"]), "nf4")
    out = capsys.readouterr().out
    printed = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert printed == rows and len(rows) == 1 and "error" not in rows[0], rows
    row = rows[0]
    assert row["peer"] == "peft+bnb-nf4" and row["preset"] == "tiny" and (row["batch"], row["seq"]) == (1, 32)
    assert row["tokens_per_s"] > 0 and row["step_s"] > 0 and row["trainable"] == 2 * 8 * (2 * 128 + 128 + 64)  # layers x r x (q: in+out, v: in+out)
    assert "tok/s" in out and "peft+bnb-nf4" in out.splitlines()[-1]
