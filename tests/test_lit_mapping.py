"""The pure lit-llama <-> jaxlora mapping (jaxlora.weights.lit_llama): exact round trips,
validation errors that name the key and both shapes, preset recognition, 7B sizes."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from conftest import random_lit_state_dict
from lit_reference import RefConfig, RefLLaMA

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.errors import LitLoRATargetsError, StateDictError
from jaxlora.weights import lit_llama

ALL = ("q", "k", "v", "o", "gate", "up", "down")


def lit_state_dict(config: LLaMAConfig, lora: LoRAConfig, dtype=np.float32, seed: int = 0):
    ref = RefLLaMA(RefConfig(config.n_layer, config.n_head, config.n_embd, config.vocab_size), lora_r=lora.r,
                   lora_targets=lora.targets)
    sd = {k: v.astype(dtype) for k, v in random_lit_state_dict(ref, seed).items()}
    return ({k: v for k, v in sd.items() if "lora_" not in k}, {k: v for k, v in sd.items() if "lora_" in k})


def assert_identical(got: dict, want: dict) -> None:
    assert list(got) == list(want)  # same keys, same order
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
        assert np.array_equal(got[k].view(np.uint8), want[k].view(np.uint8)), k  # same bits


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("targets", [("q", "v"), ("q", "k", "v"), ALL])
def test_round_trip_is_bit_exact(tiny_config, dtype, targets):
    lora = LoRAConfig(r=4, targets=targets)
    base, adapters = lit_state_dict(tiny_config, lora, dtype)
    params = lit_llama.lit_to_params(base, tiny_config)
    assert params["h"]["attn"]["c_attn"]["kernel"].shape == (2, 64, 192)
    assert params["lm_head"]["kernel"].shape == (64, 128)
    assert_identical(lit_llama.params_to_lit(params, tiny_config), base)
    tree = lit_llama.lit_to_lora(adapters, tiny_config, lora)
    n = sum(lora.qkv_enabled)
    assert tree["h"]["attn"]["c_attn"]["lora_A"].shape == (2, n, 64, 4)
    assert tree["h"]["attn"]["c_attn"]["lora_B"].shape == (2, n, 4, 64)
    assert_identical(lit_llama.lora_to_lit(tree, tiny_config, lora, lit_only=False), adapters)


def test_large_transpose_path_is_exact():
    """Matrices of >= 2^20 elements take the tiled transpose: still an exact transpose."""
    a = np.random.default_rng(0).standard_normal((1100, 1000)).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(lit_llama.transpose(a).view(np.uint16), a.T.view(np.uint16))


@pytest.mark.parametrize("targets", [("q", "k", "v"), ("k",), ("q",), ("q", "v", "o")])
def test_lit_lora_file_is_only_for_q_and_v(tiny_config, targets):
    """lit-llama's lora() builds enable_lora=[True, False, True]: any other target set is refused."""
    lora = LoRAConfig(r=4, targets=targets)
    _, adapters = lit_state_dict(tiny_config, lora)
    tree = lit_llama.lit_to_lora(adapters, tiny_config, lora)
    with pytest.raises(LitLoRATargetsError, match=r"enable_lora=\[True, False, True\].*--adapters DIR "
                                                             r"--merged"):
        lit_llama.lora_to_lit(tree, tiny_config, lora)
    assert isinstance(LitLoRATargetsError("x"), ValueError)  # the trainer logs ValueErrors and goes on
    qv = LoRAConfig(r=4, targets=("v", "q"))
    assert list(lit_llama.lora_to_lit(lit_llama.lit_to_lora(lit_state_dict(tiny_config, qv)[1], tiny_config, qv),
                                      tiny_config, qv))[:2] == ["transformer.h.0.attn.c_attn.lora_A",
                                                                "transformer.h.0.attn.c_attn.lora_B"]


def test_missing_extra_and_misshaped_keys_are_named(tiny_config):
    base, _ = lit_state_dict(tiny_config, LoRAConfig(r=0, targets=()))
    missing = dict(base)
    del missing["transformer.h.1.mlp.c_fc2.weight"]
    with pytest.raises(StateDictError, match=r"missing key 'transformer\.h\.1\.mlp\.c_fc2\.weight' "
                                             r"\(expected shape \(256, 64\)\)"):
        lit_llama.lit_to_params(missing, tiny_config)
    extra = {**base, "transformer.h.2.rms_1.scale": np.ones(64, np.float32)}
    with pytest.raises(StateDictError, match=r"unexpected key 'transformer\.h\.2\.rms_1\.scale' \(shape \(64,\)\)"):
        lit_llama.lit_to_params(extra, tiny_config)
    wrong = {**base, "transformer.h.0.attn.c_proj.weight": np.zeros((64, 32), np.float32)}
    with pytest.raises(StateDictError, match=r"key 'transformer\.h\.0\.attn\.c_proj\.weight' has shape \(64, 32\), "
                                             r"expected \(64, 64\)"):
        lit_llama.lit_to_params(wrong, tiny_config)


def test_infer_config_recognises_presets_and_names_shapes():
    for name in ("7B", "13B", "30B", "65B", "tiny"):
        cfg = LLaMAConfig.from_name(name)
        shapes = {k: m.lit_shape for m in lit_llama.base_maps(cfg) for k in m.keys(cfg.n_layer)}
        assert lit_llama.infer_config(shapes) == cfg
    cfg = LLaMAConfig(n_layer=2, n_head=4, n_embd=96, vocab_size=128)
    shapes = {k: m.lit_shape for m in lit_llama.base_maps(cfg) for k in m.keys(cfg.n_layer)}
    with pytest.raises(StateDictError, match=r"no preset has n_embd=96, n_layer=2, vocab=128 \(shapes seen: "
                                             r".*'transformer\.wte\.weight': \(128, 96\)"):
        lit_llama.infer_config(shapes, "x.pth")
    with pytest.raises(StateDictError, match=r"not a lit-llama checkpoint"):
        lit_llama.infer_config({"model.embed_tokens.weight": (32000, 4096)})


def test_lit_lora_file_is_read_as_q_and_v_and_other_shapes_are_refused(tiny_config):
    _, adapters = lit_state_dict(tiny_config, LoRAConfig(r=4, targets=("q", "v")))
    got = lit_llama.lit_lora_config({k: v.shape for k, v in adapters.items()}, 64, alpha=32)
    assert (got.r, got.alpha, got.targets) == (4, 32, ("q", "v"))
    for targets in [("q", "k", "v"), ("k",), ("q",)]:  # no guessing of targets from the number of segments
        _, other = lit_state_dict(tiny_config, LoRAConfig(r=4, targets=targets))
        with pytest.raises(StateDictError, match=r"x\.pth: 'transformer\.h\.0\.attn\.c_attn\.lora_A' has shape .*enable_lora=\[True, False, True\].*"
                                                 r"must be \(2r, 64\) and \(128, r\)"):
            lit_llama.lit_lora_config({k: v.shape for k, v in other.items()}, 64, source="x.pth")
    _, mlp = lit_state_dict(tiny_config, LoRAConfig(r=4, targets=("q", "v", "down")))
    with pytest.raises(StateDictError, match=r"holds adapters outside attn\.c_attn \(transformer\.h\.0\.mlp\.c_proj"):
        lit_llama.lit_lora_config({k: v.shape for k, v in mlp.items()}, 64)


def test_7b_shapes_and_parameter_counts_without_allocation():
    cfg = LLaMAConfig.from_name("7B")
    base = sum(int(np.prod(m.lit_shape)) * len(m.keys(cfg.n_layer)) for m in lit_llama.base_maps(cfg))
    lora = LoRAConfig(r=8)
    adapters = sum(int(np.prod(m.lit_shape)) * len(m.keys(cfg.n_layer)) for m in lit_llama.lora_maps(cfg, lora))
    assert base == cfg.num_params() == 6_738_415_616
    assert adapters == lora.num_params(cfg) == 4_194_304
    shapes = {m.lit_key: m.lit_shape for m in lit_llama.lora_maps(cfg, lora)}
    assert shapes["transformer.h.{i}.attn.c_attn.lora_A"] == (16, 4096)
    assert shapes["transformer.h.{i}.attn.c_attn.lora_B"] == (8192, 8)
    assert {m.lit_key: m.lit_shape for m in lit_llama.base_maps(cfg)}["transformer.h.{i}.mlp.c_fc1.weight"] == \
        (11008, 4096)
