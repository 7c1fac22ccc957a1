"""Tests of the PyTorch lit-llama reference itself (tests/lit_reference.py)."""
import numpy as np
import pytest
import torch
from lit_reference import RefConfig, RefLLaMA, merge_lora_, ref_lora_delta, ref_rope

TINY = RefConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=100, block_size=32)


def base_shapes(cfg: RefConfig) -> dict:
    """Expected base keys/shapes, straight from the doc's table."""
    V, C, H = cfg.padded_vocab_size, cfg.n_embd, cfg.n_hidden
    d = {"lm_head.weight": (V, C), "transformer.wte.weight": (V, C), "transformer.ln_f.scale": (C,)}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        d.update({p + "rms_1.scale": (C,), p + "attn.c_attn.weight": (3 * C, C),
                  p + "attn.c_proj.weight": (C, C), p + "rms_2.scale": (C,),
                  p + "mlp.c_fc1.weight": (H, C), p + "mlp.c_fc2.weight": (H, C),
                  p + "mlp.c_proj.weight": (C, H)})
    return d


def shapes(model: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def randomize_lora_B(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.1)


def test_tiny_config_and_keys():
    assert TINY.padded_vocab_size == 128 and TINY.n_hidden == 256  # int(2*4*64/3)=170 -> 256
    assert shapes(RefLLaMA(TINY)) == base_shapes(TINY)


def test_lora_keys_qv_and_all_targets():
    C, H, r = 64, 256, 4
    qv = shapes(RefLLaMA(TINY, lora_r=r))
    extra = {k: v for k, v in qv.items() if "lora_" in k}
    assert extra == {f"transformer.h.{i}.attn.c_attn.{n}": s for i in range(2)
                     for n, s in (("lora_A", (2 * r, C)), ("lora_B", (2 * C, r)))}
    full = shapes(RefLLaMA(TINY, lora_r=r, lora_targets=("q", "k", "v", "o", "gate", "up", "down")))
    p = "transformer.h.1."
    assert full[p + "attn.c_attn.lora_A"] == (3 * r, C) and full[p + "attn.c_attn.lora_B"] == (3 * C, r)
    assert full[p + "attn.c_proj.lora_A"] == (r, C) and full[p + "attn.c_proj.lora_B"] == (C, r)
    assert full[p + "mlp.c_fc1.lora_A"] == (r, C) and full[p + "mlp.c_fc1.lora_B"] == (H, r)
    assert full[p + "mlp.c_fc2.lora_B"] == (H, r) and full[p + "mlp.c_proj.lora_A"] == (r, H)
    assert full[p + "mlp.c_proj.lora_B"] == (C, r)
    assert {k: v for k, v in full.items() if "lora_" not in k} == base_shapes(TINY)
    with pytest.raises(AssertionError):
        RefLLaMA(TINY, lora_r=r, lora_targets=("q", "wq"))


def test_presets_7b_shapes_on_meta():
    assert [RefConfig.from_name(n).n_hidden for n in ("7B", "13B", "30B", "65B")] == [11008, 13824, 17920, 22016]
    cfg = RefConfig.from_name("7B")
    with torch.device("meta"):
        model = RefLLaMA(cfg, lora_r=8)
    s = shapes(model)
    assert {k: v for k, v in s.items() if "lora_" not in k} == base_shapes(cfg)
    assert s["transformer.h.31.attn.c_attn.lora_A"] == (16, 4096)
    assert s["transformer.h.31.attn.c_attn.lora_B"] == (8192, 8)
    n_lora = sum(p.numel() for k, p in model.named_parameters() if "lora_" in k)
    n_base = sum(p.numel() for k, p in model.named_parameters() if "lora_" not in k)
    assert (n_base, n_lora) == (6_738_415_616, 4_194_304)


def test_fresh_lora_is_identity():
    torch.manual_seed(0)
    base = RefLLaMA(TINY).eval()
    lora = RefLLaMA(TINY, lora_r=4, lora_targets=("q", "k", "v", "o", "gate", "up", "down")).eval()
    missing, unexpected = lora.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all("lora_" in k for k in missing)
    idx = torch.randint(0, 100, (2, 10))
    assert torch.equal(base(idx), lora(idx))


@pytest.mark.parametrize("targets", [("q", "v"), ("k",), ("q", "k", "v", "o", "gate", "up", "down")])
def test_merged_equals_unmerged_float64(targets):
    torch.manual_seed(0)
    model = RefLLaMA(TINY, lora_r=4, lora_alpha=16, lora_targets=targets).double().eval()
    randomize_lora_B(model)
    idx = torch.randint(0, 100, (2, 12))
    before = model(idx)
    w0 = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    merge_lora_(model)
    assert torch.allclose(model(idx), before, atol=1e-10, rtol=1e-10)
    dq, dk, dv = (model.transformer.h[0].attn.c_attn.weight - w0).split(64, dim=0)
    for name, d in zip("qkv", (dq, dk, dv)):
        assert (d.abs().max() > 0) == (name in targets)


def test_ref_lora_delta_matches_layer():
    """ΔW from the helper equals the layer's effective weight change, probed with the identity."""
    torch.manual_seed(0)
    model = RefLLaMA(TINY, lora_r=3, lora_alpha=6, lora_targets=("q", "v", "o")).double()
    randomize_lora_B(model)
    attn = model.transformer.h[1].attn
    eye = torch.eye(64, dtype=torch.float64)
    for layer, enabled in ((attn.c_attn, (True, False, True)), (attn.c_proj, None)):
        effective = layer(eye).T - layer.weight  # (out, in)
        delta = ref_lora_delta(layer.lora_A, layer.lora_B, enabled, 64, 6 / 3)
        assert torch.allclose(effective, delta, atol=1e-12)
    A, B = attn.c_attn.lora_A, attn.c_attn.lora_B
    d = ref_lora_delta(A, B, (True, False, True), 64, 2.0)
    assert torch.allclose(d[:64], 2.0 * B[:64] @ A[:3]) and torch.allclose(d[128:], 2.0 * B[64:] @ A[3:])
    assert torch.count_nonzero(d[64:128]) == 0


def test_causal():
    torch.manual_seed(0)
    model = RefLLaMA(TINY).double().eval()
    idx = torch.randint(0, 100, (1, 16))
    idx2 = idx.clone()
    idx2[0, 9] = (idx[0, 9] + 1) % 100
    a, b = model(idx), model(idx2)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_rope_numpy():
    hs, T = 16, 20
    x = torch.randn(1, T, 2, hs, dtype=torch.float64)
    out = ref_rope(x).numpy()
    xn = x.numpy()
    for p in (0, 1, 7, T - 1):
        for i in range(hs // 2):
            ang = p * 10000.0 ** (-2 * i / hs)
            x0, x1 = xn[0, p, :, 2 * i], xn[0, p, :, 2 * i + 1]
            np.testing.assert_allclose(out[0, p, :, 2 * i], x0 * np.cos(ang) - x1 * np.sin(ang), atol=1e-5)
            np.testing.assert_allclose(out[0, p, :, 2 * i + 1], x1 * np.cos(ang) + x0 * np.sin(ang), atol=1e-5)
    np.testing.assert_array_equal(out[0, 0], xn[0, 0])
    assert ref_rope(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_dropout_only_on_lora_path():
    torch.manual_seed(0)
    model = RefLLaMA(TINY, lora_r=4, lora_dropout=0.5).double()
    randomize_lora_B(model)
    layer = model.transformer.h[0].attn.c_attn
    x = torch.randn(5, 64, dtype=torch.float64)
    layer.train()
    y_train = layer(x)
    layer.eval()
    y_eval = layer(x)
    assert not torch.allclose(y_train, y_eval)
    layer.lora_B.data.zero_()
    layer.train()
    assert torch.equal(layer(x), x @ layer.weight.T)
