"""Converters: lit-llama .pth <-> jaxlora checkpoint directory, LoRA files, merged export.

lit-llama files are made by the PyTorch reference (tests/lit_reference.py) and `torch.save`.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import random_lit_state_dict
from lit_reference import RefConfig, RefLLaMA

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.errors import CheckpointError, LitLoRATargetsError, StateDictError
from jaxlora.model.llama import LLaMA
from jaxlora.model.lora import merge_lora
from jaxlora.weights import jaxlora_dir as cio
from jaxlora.weights import lit_llama
from jaxlora.weights.convert import checkpoint_to_lit, lit_to_checkpoint
from jaxlora.weights.load import load_checkpoint
from jaxlora.weights.torch_io import tensor_to_numpy
from jaxlora.weights.torch_zip import RowBlocks, TorchZipReader, write_torch_zip

ROOT = Path(__file__).resolve().parent.parent
ALL = ("q", "k", "v", "o", "gate", "up", "down")
TINY = LLaMAConfig.from_name("tiny")


def make_ref(lora: LoRAConfig, config: LLaMAConfig = TINY, seed: int = 0):
    ref = RefLLaMA(RefConfig(config.n_layer, config.n_head, config.n_embd, config.vocab_size), lora_r=lora.r,
                   lora_alpha=lora.alpha, lora_dropout=0.0, lora_targets=lora.targets).eval()
    sd = random_lit_state_dict(ref, seed)
    return ref, sd


def save_lit(tmp: Path, lora: LoRAConfig, dtype=torch.float32, config: LLaMAConfig = TINY, seed: int = 0):
    """lit-llama.pth and the LoRA file (torch.save, as lit-llama writes them); returns paths and tensors."""
    ref, sd = make_ref(lora, config, seed)
    base = {k: torch.from_numpy(v).to(dtype) for k, v in sd.items() if "lora_" not in k}
    adapters = {k: torch.from_numpy(v).to(dtype) for k, v in sd.items() if "lora_" in k}
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(base, tmp / "lit-llama.pth")
    torch.save(adapters, tmp / "lit-llama-lora-finetuned.pth")
    return tmp / "lit-llama.pth", tmp / "lit-llama-lora-finetuned.pth", base, adapters, ref


def tiny_variables(lora: LoRAConfig, seed: int = 0) -> dict:
    """Random {"params", "lora"} (B non-zero) through the mapping: no model init to compile."""
    _, sd = make_ref(lora, seed=seed)
    variables = {"params": lit_llama.lit_to_params({k: v for k, v in sd.items() if "lora_" not in k}, TINY)}
    if lora.r:
        variables["lora"] = lit_llama.lit_to_lora({k: v for k, v in sd.items() if "lora_" in k}, TINY, lora)
    return variables


def assert_same_file(path: Path, want: dict) -> None:
    got = torch.load(path, weights_only=True)
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].view(torch.uint8) if v.dim() else got[k], v.view(torch.uint8) if v.dim() else v), k


def no_leftovers(parent: Path, name: str) -> None:
    """Nothing under the final name, and no temporary file or folder beside it."""
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], list(parent.iterdir())


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_round_trip_base_and_lora_bit_exact(tmp_path, dtype, monkeypatch):
    # Small chunks, so wte and lm_head also go through the row-block path.
    monkeypatch.setattr(cio, "MAX_CHUNK_BYTES", 4096)
    lora = LoRAConfig(r=4, alpha=16, targets=("q", "v"))
    base_path, lora_path, base, adapters, _ = save_lit(tmp_path / "lit", lora, dtype)
    config, lora_config, stats = lit_to_checkpoint(base_path, tmp_path / "ck", lora_path=lora_path, lora_alpha=32,
                                                   progress=False)
    assert config == TINY and lora_config == LoRAConfig(r=4, alpha=32, dropout=0.05, targets=("q", "v"))
    assert stats["bytes"] == sum(v.numel() * v.element_size() for v in {**base, **adapters}.values())
    assert cio.is_jaxlora_checkpoint(tmp_path / "ck")
    assert (tmp_path / "ck" / "params" / "lm_head.kernel" / ".zarray").is_file()
    checkpoint_to_lit(tmp_path / "ck", tmp_path / "base.pth", kind="base", progress=False)
    checkpoint_to_lit(tmp_path / "ck", tmp_path / "lora.pth", kind="lora", progress=False)
    assert_same_file(tmp_path / "base.pth", base)
    assert_same_file(tmp_path / "lora.pth", adapters)
    # torch's mmap loader (which needs aligned records) reads our files too.
    assert torch.equal(torch.load(tmp_path / "base.pth", mmap=True, weights_only=True)["lm_head.weight"],
                       base["lm_head.weight"])


def test_checkpoint_format_is_the_documented_one_and_load_checkpoint_casts(tmp_path):
    lora = LoRAConfig(r=4, targets=("q", "v"))
    base_path, lora_path, base, adapters, _ = save_lit(tmp_path / "lit", lora, torch.bfloat16)
    lit_to_checkpoint(base_path, tmp_path / "ck", lora_path=lora_path, progress=False)
    # The documented format, read with tensorstore alone (no jaxlora code): index.json lists the
    # leaves; each is a zarr v2 array in the directory named by its path joined with ".".
    import json

    import tensorstore as ts
    index = json.loads((tmp_path / "ck" / "params" / "index.json").read_text())
    assert (index["format"], index["version"]) == ("jaxlora-arrays", 1)
    plain = {}
    for name, leaf in index["leaves"].items():
        array = ts.open({"driver": "zarr", "kvstore": f"file://{tmp_path / 'ck' / 'params' / name.replace('/', '.')}"},
                        open=True).result()
        assert list(array.shape) == leaf["shape"] and array.dtype.name == leaf["dtype"]
        plain[tuple(name.split("/"))] = array.read().result()
    want = lit_llama.lit_to_params({k: tensor_to_numpy(v) for k, v in base.items()}, TINY)
    from flax import traverse_util
    flat_want = traverse_util.flatten_dict(want)
    assert set(plain) == set(flat_want)
    for path, value in flat_want.items():
        assert plain[path].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(plain[path], value)
    # load_checkpoint: device arrays; params keep bf16 unless cast; adapters float32 by default.
    config, lora_config, variables = load_checkpoint(tmp_path / "ck")
    assert config == TINY and lora_config.r == 4
    assert isinstance(variables["params"]["wte"]["embedding"], jax.Array)
    assert variables["params"]["wte"]["embedding"].dtype == jnp.bfloat16
    assert variables["lora"]["h"]["attn"]["c_attn"]["lora_A"].dtype == jnp.float32
    _, _, cast = load_checkpoint(tmp_path / "ck", param_dtype=jnp.float32, lora_dtype=None)
    assert cast["params"]["h"]["attn"]["c_attn"]["kernel"].dtype == jnp.float32
    assert cast["lora"]["h"]["attn"]["c_attn"]["lora_A"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(cast["params"]["lm_head"]["kernel"]),
                                  want["lm_head"]["kernel"].astype(np.float32))
    # --dtype converts the frozen weights while converting.
    lit_to_checkpoint(base_path, tmp_path / "ck32", dtype="float32", progress=False)
    assert load_checkpoint(tmp_path / "ck32")[2]["params"]["ln_f"]["scale"].dtype == jnp.float32


def test_save_and_load_checkpoint_round_trip(tmp_path):
    lora = LoRAConfig(r=4, targets=("q", "v", "o"))
    variables = tiny_variables(lora)
    cio.save_checkpoint(tmp_path / "ck", TINY, lora, variables["params"], variables["lora"])
    config, lora_config, got = load_checkpoint(tmp_path / "ck")
    assert (config, lora_config) == (TINY, lora)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, variables)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    _, _, got = load_checkpoint(tmp_path / "ck", shardings={"params": sharding})
    assert got["params"]["wte"]["embedding"].sharding == sharding
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        cio.save_checkpoint(tmp_path / "ck", TINY, None, variables["params"])
    cio.save_checkpoint(tmp_path / "ck", TINY, None, variables["params"], overwrite=True)
    config, lora_config, got = load_checkpoint(tmp_path / "ck")
    assert lora_config is None and set(got) == {"params"} and not (tmp_path / "ck" / "lora").exists()


SHARDED_LOAD = """
import sys, jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxlora.weights import jaxlora_dir as cio
from jaxlora.weights.load import load_checkpoint
mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
by_layer, replicated = NamedSharding(mesh, P("x")), NamedSharding(mesh, P())
reads = []
real_read = cio.ArrayTreeReader.read
cio.ArrayTreeReader.read = lambda self, path, where=None: reads.append((path, where)) or real_read(self, path, where)
stored = cio.ArrayTreeReader(sys.argv[1] + "/params").shapes()
from flax import traverse_util
shardings = {"params": traverse_util.unflatten_dict({p: by_layer if cio.is_layered(p) else replicated for p in stored})}
_, _, got = load_checkpoint(sys.argv[1], shardings=shardings)
kernel = got["params"]["h"]["attn"]["c_attn"]["kernel"]
assert kernel.sharding == by_layer and kernel.addressable_shards[1].data.shape == (1, 64, 192)
np.save(sys.argv[1] + "/kernel.npy", np.asarray(kernel))
for path, where in reads:
    rows = where[0] if where else slice(None)
    if cio.is_layered(path):  # two devices, one layer each: each read is one layer, never the stack
        assert rows.stop - rows.start == 1, (path, where)
    else:  # replicated: one read serves both devices
        assert rows == slice(None), (path, where)
assert len(reads) == sum(2 if cio.is_layered(p) else 1 for p in stored), reads
print("OK", len(reads))
"""


def test_load_checkpoint_reads_only_the_shards_each_device_holds(tmp_path):
    """Each leaf goes straight into its sharding, read per shard: a layer-sharded leaf is never
    read whole, a replicated one once for all its devices (2 CPU devices in a subprocess)."""
    variables = tiny_variables(LoRAConfig(r=0, targets=()))
    cio.save_checkpoint(tmp_path / "ck", TINY, None, variables["params"])
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"}
    p = subprocess.run([sys.executable, "-c", SHARDED_LOAD, str(tmp_path / "ck")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "ck" / "kernel.npy"),
                                  variables["params"]["h"]["attn"]["c_attn"]["kernel"])


def test_load_checkpoint_errors_name_the_directory_and_key(tmp_path):
    variables = tiny_variables(LoRAConfig(r=0, targets=()))
    with pytest.raises(CheckpointError, match=r"ck/params: h/attn/c_proj/kernel has shape \(2, 64, 32\), "
                                                  r"expected \(2, 64, 64\)"):
        bad = jax.tree.map(lambda a: a, variables["params"])
        bad["h"]["attn"]["c_proj"]["kernel"] = bad["h"]["attn"]["c_proj"]["kernel"][..., :32]
        cio.save_checkpoint(tmp_path / "ck", TINY, None, bad)
    no_leftovers(tmp_path, "ck")
    cio.save_checkpoint(tmp_path / "ck", TINY, None, variables["params"])
    # config.json that does not match the arrays
    (tmp_path / "ck" / "config.json").write_text(cio.dump_json(LLaMAConfig.from_name("tiny", n_layer=3), None))
    with pytest.raises(CheckpointError, match=r"ck/params: .*h/attn/c_attn/kernel has shape \(2, 64, 192\), "
                                                  r"expected \(3, 64, 192\)"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"ck: no config\.json; not a jaxlora checkpoint"):
        load_checkpoint(tmp_path / "ck")
    assert not cio.is_jaxlora_checkpoint(tmp_path / "ck")


# ---------------------------------------------------------------------------------------------
# Against the PyTorch reference


def test_exported_lora_file_loads_into_reference_and_logits_match(tmp_path):
    lora = LoRAConfig(r=4, alpha=16, dropout=0.0, targets=("q", "v"))
    base_path, lora_path, base, _, _ = save_lit(tmp_path / "lit", lora, seed=3)
    lit_to_checkpoint(base_path, tmp_path / "ck", lora_path=lora_path, lora_dropout=0.0, progress=False)
    checkpoint_to_lit(tmp_path / "ck", tmp_path / "exported-lora.pth", kind="lora", progress=False)
    # As lit-llama's generate/lora.py: model built under lora(...), base then LoRA, both strict=False.
    fresh = RefLLaMA(RefConfig(TINY.n_layer, TINY.n_head, TINY.n_embd, TINY.vocab_size), lora_r=4, lora_alpha=16,
                     lora_targets=("q", "v")).eval()
    r1 = fresh.load_state_dict(torch.load(base_path, weights_only=True), strict=False)
    assert not r1.unexpected_keys and all("lora_" in k for k in r1.missing_keys)
    r2 = fresh.load_state_dict(torch.load(tmp_path / "exported-lora.pth", weights_only=True), strict=False)
    assert not r2.unexpected_keys
    assert not [k for k in r2.missing_keys if "lora_" in k]
    idx = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 16))
    with torch.no_grad():
        expected = fresh(torch.from_numpy(idx)).numpy()
    config, lora_config, variables = load_checkpoint(tmp_path / "ck")
    got = np.asarray(LLaMA(config, lora_config).apply(variables, jnp.asarray(idx)))
    err = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert err <= 1e-5, err


def test_merged_export_equals_base_plus_adapters(tmp_path):
    # All seven targets: q, k, v in the fused projection, o-proj and the MLP.
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=ALL)
    variables = tiny_variables(lora, seed=1)
    cio.save_checkpoint(tmp_path / "ck", TINY, lora, variables["params"], variables["lora"])
    with pytest.raises(StateDictError, match=r"adapters on targets \(q, k, v, o, gate, up, down\) cannot be written "
                                             r"as a lit-llama LoRA file"):
        checkpoint_to_lit(tmp_path / "ck", tmp_path / "lora.pth", kind="lora", progress=False)
    no_leftovers(tmp_path, "lora.pth")
    checkpoint_to_lit(tmp_path / "ck", tmp_path / "merged.pth", kind="merged", progress=False)
    merged_sd = {k: tensor_to_numpy(v) for k, v in torch.load(tmp_path / "merged.pth", weights_only=True).items()}
    assert not [k for k in merged_sd if "lora_" in k]
    merged = lit_llama.lit_to_params(merged_sd, TINY)  # a plain lit-llama checkpoint
    with jax.default_matmul_precision("highest"):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), merged,
                     merge_lora(variables["params"], variables["lora"], lora))
    idx = jnp.asarray(np.random.default_rng(2).integers(0, TINY.vocab_size, (2, 16)))
    want = np.asarray(LLaMA(TINY, lora).apply(variables, idx))
    got = np.asarray(LLaMA(TINY).apply({"params": merged}, idx))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5


@pytest.mark.parametrize("targets", [("q", "k", "v"), ("k",)])
def test_non_qv_adapters_are_never_a_lit_lora_file_but_export_merged(tmp_path, targets):
    """lit-llama's lora() means q and v: q,k,v or k-only adapters would load wrongly there."""
    from jaxlora.weights.lit_files import save_lit_lora
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=targets)
    variables = tiny_variables(lora, seed=6)
    cio.save_checkpoint(tmp_path / "base", TINY, None, variables["params"])
    cio.save_checkpoint(tmp_path / "adapters", TINY, lora, None, variables["lora"], base="base")
    why = r"enable_lora=\[True, False, True\].*convert/to_lit_llama\.py --checkpoint_dir BASE --adapters DIR --merged"
    with pytest.raises(LitLoRATargetsError, match=why):
        checkpoint_to_lit(None, tmp_path / "lora.pth", kind="lora", adapters_dir=tmp_path / "adapters", progress=False)
    no_leftovers(tmp_path, "lora.pth")
    with pytest.raises(ValueError, match=why):  # what the trainer calls at the end of a run
        save_lit_lora(variables["lora"], TINY, lora, tmp_path / "lora.pth")
    no_leftovers(tmp_path, "lora.pth")
    p = run_cli("convert/to_lit_llama.py", "--adapters", str(tmp_path / "adapters"), "--out", str(tmp_path / "l.pth"))
    assert p.returncode == 2 and "cannot be written as a lit-llama LoRA file" in p.stderr, p.stderr
    checkpoint_to_lit(tmp_path / "base", tmp_path / "merged.pth", kind="merged", adapters_dir=tmp_path / "adapters",
                      progress=False)
    merged = lit_llama.lit_to_params({k: tensor_to_numpy(v) for k, v in
                                      torch.load(tmp_path / "merged.pth", weights_only=True).items()}, TINY)
    with jax.default_matmul_precision("highest"):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), merged,
                     merge_lora(variables["params"], variables["lora"], lora))
    k_kernel = merged["h"]["attn"]["c_attn"]["kernel"][..., 64:128]  # the k segment moved: its adapter is in
    assert not np.array_equal(k_kernel, np.asarray(variables["params"]["h"]["attn"]["c_attn"]["kernel"][..., 64:128]))


def test_lit_lora_file_of_another_shape_is_refused(tmp_path, lit_files):
    """A LoRA file holding q,k,v (3 segments) is not lit-llama's: refused, not guessed at."""
    from jaxlora.weights.lit_files import load_lit_llama
    qkv_path = save_lit(tmp_path / "qkv", LoRAConfig(r=4, targets=("q", "k", "v")))[1]
    why = r"lora_A' has shape \(12, 64\) and .*lora_B' \(192, 4\); lit-llama's LoRA file always means adapters on q and v"
    with pytest.raises(StateDictError, match=why):
        lit_to_checkpoint(lit_files[0], tmp_path / "out", lora_path=qkv_path, progress=False)
    no_leftovers(tmp_path, "out")
    with pytest.raises(StateDictError, match=why):
        load_lit_llama(lit_files[0], qkv_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_export_from_lit_base_pth_equals_from_directory(tmp_path, dtype):
    """Adapters-only dir + lit-llama's own base .pth -> the same merged file as via a converted base."""
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q", "v", "o", "down"))
    base_path, _, _, _, _ = save_lit(tmp_path / "lit", LoRAConfig(r=0, targets=()), dtype=dtype, seed=4)
    lit_to_checkpoint(base_path, tmp_path / "base", progress=False)
    adapters = tiny_variables(lora, seed=5)["lora"]
    cio.save_checkpoint(tmp_path / "adapters", TINY, lora, None, adapters, base=str(base_path))
    checkpoint_to_lit(tmp_path / "base", tmp_path / "from_dir.pth", kind="merged", adapters_dir=tmp_path / "adapters",
                      progress=False)
    checkpoint_to_lit(base_path, tmp_path / "from_pth.pth", kind="merged", adapters_dir=tmp_path / "adapters",
                      progress=False)
    want = torch.load(tmp_path / "from_dir.pth", weights_only=True)
    assert_same_file(tmp_path / "from_pth.pth", want)  # bit-identical, keys in lit-llama's order
    assert want["transformer.h.0.attn.c_proj.weight"].dtype == dtype
    with pytest.raises(ValueError, match=r"lit-llama\.pth: a lit-llama \.pth serves as the base only for a merged"):
        checkpoint_to_lit(base_path, tmp_path / "x.pth", kind="base", progress=False)
    no_leftovers(tmp_path, "x.pth")


# ---------------------------------------------------------------------------------------------
# The torch zip reader / writer


def test_torch_zip_reader_matches_torch_load(tmp_path):
    sd = {"a": torch.randn(5, 7), "b": torch.randn(3, 4).to(torch.bfloat16), "t": torch.arange(6.).reshape(2, 3).t(),
          "view": torch.randn(10)[2:5], "scalar": torch.tensor(3.0), "empty": torch.zeros(0, 4),
          "half": torch.randn(4, 4).half(), "int": torch.arange(5)}
    torch.save(sd, tmp_path / "x.pth")
    with TorchZipReader(tmp_path / "x.pth") as reader:
        assert reader.keys() == list(sd)
        for k, v in sd.items():
            got, want = reader.read(k), tensor_to_numpy(v.contiguous())
            assert got.dtype == want.dtype and got.shape == want.shape, k
            assert np.array_equal(got.reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8)), k
        np.testing.assert_array_equal(reader.read("a", rows=(1, 3)), sd["a"][1:3].numpy())
        items = [(k, reader.read(k)) for k in reader.keys()]
    items[0] = ("a", RowBlocks((5, 7), np.dtype(np.float32), (sd["a"][i:i + 2].numpy() for i in range(0, 5, 2))))
    write_torch_zip(tmp_path / "y.pth", items)
    with TorchZipReader(tmp_path / "y.pth") as written:  # records 64-byte aligned, as torch's own
        assert all(written._data_offset(t.storage_key, 0)[0] % 64 == 0 for t in written.tensors.values())
    for mmap in (False, True):
        back = torch.load(tmp_path / "y.pth", mmap=mmap, weights_only=True)
        assert list(back) == list(sd)
        for k, v in sd.items():
            assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error and no output


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_lit_llama_reads_tensor_by_tensor_and_matches_the_mapping(tmp_path, dtype):
    from jaxlora.weights.lit_files import load_lit_llama
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q", "v"))
    base_path, lora_path, base, adapters, _ = save_lit(tmp_path / "lit", lora, dtype=dtype, seed=7)
    np_base = {k: tensor_to_numpy(v) for k, v in base.items()}
    np_lora = {k: tensor_to_numpy(v) for k, v in adapters.items()}
    placed = []
    config, lora_config, got = load_lit_llama(base_path, lora_path, lora_alpha=8, lora_dropout=0.0,
                                              place=lambda a, path: placed.append(a.shape) or jax.device_put(a))
    assert config == TINY and lora_config == lora
    assert len(placed) == len(jax.tree.leaves(got))  # every leaf went through `place`, one at a time
    want_params = lit_llama.lit_to_params(np_base, TINY)
    want_lora = lit_llama.lit_to_lora(np_lora, TINY, lora)
    for x, y in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(want_params)):
        assert isinstance(x, jax.Array) and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), y)  # bit-exact, bf16 too
    for x, y in zip(jax.tree.leaves(got["lora"]), jax.tree.leaves(want_lora)):
        assert x.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(x), y.astype(np.float32))
    _, _, cast = load_lit_llama(base_path, param_dtype=jnp.float32)
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(cast["params"]))
    with pytest.raises(StateDictError, match=r"lit-llama\.pth: .*shape"):
        load_lit_llama(base_path, config=LLaMAConfig.from_name("tiny", n_embd=32, n_head=2))


@pytest.fixture
def lit_files(tmp_path):
    return save_lit(tmp_path / "lit", LoRAConfig(r=4, targets=("q", "v")))


def test_truncated_non_zip_and_damaged_files(tmp_path, lit_files):
    base_path = lit_files[0]
    data = base_path.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pth").write_text("not a checkpoint")
    damaged = bytearray(data)
    with TorchZipReader(base_path) as reader:  # flip a byte inside lm_head.weight's data
        offset, _ = reader._data_offset(reader.tensors["lm_head.weight"].storage_key, 0)
    damaged[offset + 100] ^= 0xFF
    (tmp_path / "damaged.pth").write_bytes(bytes(damaged))
    for name, message in [("truncated.pth", r"truncated\.pth: not a PyTorch zip checkpoint \(truncated"),
                          ("text.pth", r"text\.pth: not a PyTorch zip checkpoint"),
                          ("damaged.pth", r"damaged\.pth: tensor 'lm_head\.weight' is damaged \(CRC mismatch\)"),
                          ("missing.pth", r"missing\.pth: no such file")]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            lit_to_checkpoint(tmp_path / name, tmp_path / "out", progress=False)
        no_leftovers(tmp_path, "out")


def test_lora_file_that_disagrees_with_the_base(tmp_path, lit_files):
    base_path, lora_path = lit_files[0], lit_files[1]
    # A LoRA file for a 4-layer model.
    other = save_lit(tmp_path / "deeper", LoRAConfig(r=4, targets=("q", "v")), config=TINY.__class__.from_name(
        "tiny", n_layer=4))[1]
    with pytest.raises(StateDictError, match=r"adapters for 4 layers, the base checkpoint has 2 layers"):
        lit_to_checkpoint(base_path, tmp_path / "out", lora_path=other, progress=False)
    no_leftovers(tmp_path, "out")
    # r disagreeing between layers / between A and B.
    adapters = torch.load(lora_path, weights_only=True)
    adapters["transformer.h.1.attn.c_attn.lora_B"] = torch.zeros(128, 8)
    torch.save(adapters, tmp_path / "mixed_r.pth")
    with pytest.raises(StateDictError, match=r"lora_B tensors disagree on r \(ranks \[4, 8\]\)"):
        lit_to_checkpoint(base_path, tmp_path / "out", lora_path=tmp_path / "mixed_r.pth", progress=False)
    adapters = torch.load(lora_path, weights_only=True)
    adapters["transformer.h.0.attn.c_attn.lora_A"] = torch.zeros(16, 64)
    torch.save(adapters, tmp_path / "bad_a.pth")
    with pytest.raises(StateDictError, match=r"'transformer\.h\.0\.attn\.c_attn\.lora_A' has shape \(16, 64\) and "
                                             r"'transformer\.h\.0\.attn\.c_attn\.lora_B' \(128, 4\);"):
        lit_to_checkpoint(base_path, tmp_path / "out", lora_path=tmp_path / "bad_a.pth", progress=False)
    # A LoRA file of another width.
    wide = save_lit(tmp_path / "wide", LoRAConfig(r=4, targets=("q", "v")), config=LLaMAConfig.from_name("demo"))[1]
    with pytest.raises(StateDictError, match=r"lora_A' has shape \(8, 128\) and .*lora_B' \(256, 4\); lit-llama's LoRA "
                                             r"file always means adapters on q and v"):
        lit_to_checkpoint(base_path, tmp_path / "out", lora_path=wide, progress=False)
    no_leftovers(tmp_path, "out")


def test_unknown_shape_is_refused_unless_described(tmp_path):
    odd = LLaMAConfig(n_layer=2, n_head=4, n_embd=96, vocab_size=128)
    base_path = save_lit(tmp_path / "odd", LoRAConfig(r=0, targets=()), config=odd)[0]
    with pytest.raises(StateDictError, match=r"no preset has n_embd=96, n_layer=2, vocab=128 \(shapes seen: .*"
                                             r"\(128, 96\)"):
        lit_to_checkpoint(base_path, tmp_path / "out", progress=False)
    no_leftovers(tmp_path, "out")
    config, _, _ = lit_to_checkpoint(base_path, tmp_path / "out", config=odd, progress=False)
    assert load_checkpoint(tmp_path / "out")[0] == odd


def test_existing_output_is_refused_unless_overwrite(tmp_path, lit_files):
    base_path = lit_files[0]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match=r"out already exists; pass --overwrite"):
        lit_to_checkpoint(base_path, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").exists()
    lit_to_checkpoint(base_path, tmp_path / "out", overwrite=True, progress=False)
    assert cio.is_jaxlora_checkpoint(tmp_path / "out") and not (tmp_path / "out" / "keep.txt").exists()
    (tmp_path / "x.pth").write_text("old")
    with pytest.raises(FileExistsError, match=r"x\.pth already exists"):
        checkpoint_to_lit(tmp_path / "out", tmp_path / "x.pth", kind="base", progress=False)
    assert (tmp_path / "x.pth").read_text() == "old"


def test_interrupted_conversions_leave_nothing(tmp_path, lit_files, monkeypatch):
    base_path = lit_files[0]

    def interrupted_at_fifth_call(real):
        calls = {"n": 0}

        def wrapper(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt
            return real(self, *args, **kwargs)
        return wrapper

    real_write = cio.ArrayTreeWriter.write
    monkeypatch.setattr(cio.ArrayTreeWriter, "write", interrupted_at_fifth_call(real_write))
    with pytest.raises(KeyboardInterrupt):
        lit_to_checkpoint(base_path, tmp_path / "out", progress=False)
    no_leftovers(tmp_path, "out")
    monkeypatch.setattr(cio.ArrayTreeWriter, "write", real_write)
    lit_to_checkpoint(base_path, tmp_path / "out", progress=False)

    monkeypatch.setattr(cio.ArrayTreeReader, "read", interrupted_at_fifth_call(cio.ArrayTreeReader.read))
    with pytest.raises(KeyboardInterrupt):
        checkpoint_to_lit(tmp_path / "out", tmp_path / "back.pth", kind="base", progress=False, workers=0)
    no_leftovers(tmp_path, "back.pth")


# ---------------------------------------------------------------------------------------------
# The command lines


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_clis(args)[0]


def run_clis(*commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """`python *args` for each command, all at once (each mostly imports, on one core), in order."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for args in commands]
    done = []
    try:
        for args, proc in zip(commands, procs):
            out, err = proc.communicate(timeout=120)
            done.append(subprocess.CompletedProcess([sys.executable, *args], proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return done


def test_cli_round_trip_and_errors(tmp_path):
    lora = LoRAConfig(r=4, targets=("q", "v"))
    base_path, lora_path, base, adapters, _ = save_lit(tmp_path / "lit", lora, torch.bfloat16)
    ck = tmp_path / "ck"
    # the conversion, and meanwhile the commands that need none of its output
    p, missing, help_from, help_to = run_clis(
        ("convert/from_lit_llama.py", "--checkpoint_path", str(base_path), "--lora_path", str(lora_path),
         "--lora_alpha", "32", "--out_dir", str(ck)),
        ("convert/to_lit_llama.py", "--checkpoint_dir", str(tmp_path / "nope"), "--out", str(tmp_path / "x.pth")),
        ("convert/from_lit_llama.py", "--help"), ("convert/to_lit_llama.py", "--help"))
    assert p.returncode == 0, p.stderr
    assert "from_lit_llama:" in p.stderr and "B/s" in p.stderr  # tqdm: bytes done, rate, ETA
    assert cio.read_config(ck)[1].alpha == 32
    p = run_cli("convert/from_lit_llama.py", "--checkpoint_path", str(base_path), "--out_dir", str(ck))
    assert p.returncode == 2 and "already exists; pass --overwrite" in p.stderr
    p = run_cli("convert/to_lit_llama.py", "--checkpoint_dir", str(ck), "--out", str(tmp_path / "lora.pth"),
                "--quiet")  # after the refusal: it left the checkpoint as it was
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert_same_file(tmp_path / "lora.pth", adapters)
    assert missing.returncode == 2 and "no such checkpoint directory" in missing.stderr
    # the example keeps its line breaks
    assert help_from.returncode == 0 and "lit-llama.pth \\\n        [--lora_path" in help_from.stdout, help_from.stdout
    help_text = help_to.stdout
    assert "--merged" in help_text and "--base" in help_text and "--dtype" in help_text
