"""train.py's device-memory decision (jaxlora.train.memory) and the estimate under it
(jaxlora.train.accounting), on CPU with made-up cards: the estimate against the memory measured
on an H200 (docs/benchmarks.md), setting / leaving / refusing the allocator's share, reading
nvidia-smi, and that train.py decides before JAX starts its backend."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxlora.config import LLaMAConfig
from jaxlora.errors import TrainingError
from jaxlora.train import memory
from jaxlora.train.accounting import GIB, estimate_device_bytes, flops_per_token, mfu
from jaxlora.train.settings import TrainArgs, resolve_args
from jaxlora.train.spec import run_spec

ROOT = Path(__file__).resolve().parents[1]
H200_MIB, H100_MIB = 143771, 81559  # nvidia-smi's memory.total of a 141 GB H200 and an 80 GB H100


def _estimate(preset: str, quantize: str, tensor: int, rows: int, seq: int) -> float:
    a = resolve_args(TrainArgs(preset=preset, pretrained_path="none", quantize=quantize, micro_batch_size=rows,
                               max_seq_length=seq))
    spec = run_spec(a)
    shape = {"data": 1, "fsdp": 1, "tensor": tensor}
    return estimate_device_bytes(LLaMAConfig.from_name(preset), spec.lora, spec.speed, shape, rows, seq).total / GIB


# (preset, --quantize, tensor, rows, seq, GiB measured, tolerance): the lit-llama recipe's step
# (LoRA r=8 on q,v, bf16, dots_no_batch remat) on H200s. One device: XLA's compiled memory of the
# step (docs/bench_logs/2026-12-01/ours_7b_h200.log, ours_7b_nf4_h200.log), and for 65B the process
# peak at XLA_PYTHON_CLIENT_MEM_FRACTION=0.99 (issue 18); 2 and 4 devices: compiled memory per GPU
# (bench_logs/scale_65b_h200x2.jsonl, x4_65b_t4_80g.jsonl).
MEASURED = [
    ("7B", "none", 1, 4, 256, 16.07, 0.01), ("7B", "none", 1, 8, 512, 26.46, 0.01),
    ("7B", "none", 1, 2, 2048, 26.46, 0.01), ("7B", "nf4-dq", 1, 4, 256, 7.12, 0.01),
    ("7B", "nf4-dq", 1, 8, 512, 17.51, 0.01), ("7B", "int8", 1, 4, 256, 10.04, 0.01),
    ("7B", "int8", 1, 8, 512, 20.43, 0.01), ("65B", "none", 1, 4, 256, 137.9, 0.01),
    ("65B", "none", 2, 4, 256, 70.12, 0.03), ("65B", "none", 4, 4, 256, 36.72, 0.03),
]


@pytest.mark.parametrize("preset,quantize,tensor,rows,seq,measured,tol", MEASURED,
                         ids=[f"{p}-{q}-t{t}-{r}x{s}" for p, q, t, r, s, *_ in MEASURED])
def test_estimate_is_within_tolerance_of_the_measured_memory(preset, quantize, tensor, rows, seq, measured, tol):
    assert _estimate(preset, quantize, tensor, rows, seq) == pytest.approx(measured, rel=tol)


def test_usable_share_leaves_a_gib_outside_the_allocator():
    assert memory.usable_fraction(H200_MIB * 2**20) == 0.99  # what the 65B bench ran with
    assert memory.usable_fraction(H100_MIB * 2**20) == 0.98


def _plan(env: dict, mib: int = H200_MIB, n: int = 1, **settings):
    a = resolve_args(TrainArgs(**{"preset": "65b", "pretrained_path": "none", **settings}))
    return memory.plan_memory(a, LLaMAConfig.from_name(a.preset), [mib * 2**20] * n, 1, env)


def test_65b_on_one_h200_gets_nearly_the_whole_card():
    plan = _plan({})
    assert plan.set_fraction and plan.fraction == 0.99 and plan.mesh == {"data": 1, "fsdp": 1, "tensor": 1}
    for number in ("~137.8 GiB per GPU", "140.4 GiB card (75%, 105.3 GiB)", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.99",
                   "139.0 GiB"):
        assert number in plan.message, plan.message


def test_a_run_that_fits_the_default_share_is_left_alone():
    for plan in (_plan({}, preset="7b"), _plan({}, n=2), _plan({}, mib=H100_MIB, n=4)):
        assert not plan.set_fraction and plan.fraction == 0.75 and plan.message is None
    assert _plan({}, n=2).mesh["tensor"] == 2 and _plan({}, mib=H100_MIB, n=4).mesh["tensor"] == 4  # the default layout


def test_the_users_share_is_kept_with_a_warning():
    plan = _plan({memory.FRACTION_VAR: "0.8"})
    assert not plan.set_fraction and plan.fraction == 0.8
    assert plan.message.startswith("warning:") and "XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 gives JAX 112.3 GiB" in plan.message


@pytest.mark.parametrize("mib,settings,needs", [(H100_MIB, {}, "~137.8 GiB"),
                                                 (H200_MIB, {"micro_batch_size": 8, "max_seq_length": 512}, "~185.3")])
def test_a_run_larger_than_the_card_is_refused_naming_the_numbers(mib, settings, needs):
    with pytest.raises(TrainingError) as e:
        _plan({}, mib=mib, **settings)
    for words in (needs, f"one {mib * 2**20 / GIB:.1f} GiB GPU", "--quantize nf4-dq (frozen weights 32.1 GiB)",
                  "--mesh tensor=N", "--micro_batch_size", "set XLA_PYTHON_CLIENT_MEM_FRACTION yourself"):
        assert words in str(e.value), str(e.value)


def test_prepare_sets_only_the_share_and_says_so_once():
    env = {memory.CARDS_VAR: str(H200_MIB), "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    said = []
    memory.prepare_device_memory(TrainArgs(preset="65b", pretrained_path="none"), None, said.append, env)
    assert env == {memory.CARDS_VAR: str(H200_MIB), "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
                   memory.FRACTION_VAR: "0.99"}
    assert len(said) == 1 and said[0].startswith("memory: ")
    # settings the run will refuse itself are left to it (it names every bad input at once)
    assert memory.prepare_device_memory(TrainArgs(preset="65b", pretrained_path="/no/such.pth"), None, said.append,
                                        {memory.CARDS_VAR: str(H200_MIB)}) is None


def _fp8_plan(mib: int, **settings):
    a = resolve_args(TrainArgs(**{"pretrained_path": "none", "quantize": "fp8", **settings}))
    return memory.plan_fp8_layouts(a, LLaMAConfig.from_name(a.preset), [mib * 2**20], 1, {})


def test_fp8_keeps_both_kernel_layouts_where_the_run_still_fits():
    plan = _fp8_plan(H200_MIB, preset="7b")  # 7B: ~6 GiB more, far inside an H200's default share
    assert plan.fp8_both_layouts and plan.fits and not plan.set_fraction
    assert "fp8: frozen kernels kept in both layouts (+6.0 GiB a GPU" in plan.message, plan.message
    one = memory.plan_memory(resolve_args(TrainArgs(preset="7b", pretrained_path="none", quantize="fp8")),
                             LLaMAConfig.from_name("7b"), [H200_MIB * 2**20], 1, {})
    assert plan.estimate.weights - one.estimate.weights == pytest.approx(6.0 * GIB, rel=0.01)


def test_fp8_drops_the_second_layout_where_only_one_fits():
    # 65B in fp8: ~61 GiB of kernels, ~121 GiB with both; an 80 GB card holds only the first
    plan = _fp8_plan(H100_MIB, preset="65b", remat="full")
    assert plan.fp8_both_layouts is False and plan.fits, plan
    assert "kept in one layout" in plan.message
    # On an H200 both would fit, at ~137.8 GiB of 139.0: within the estimate's error, so not taken
    near = _fp8_plan(H200_MIB, preset="65b")
    assert near.fp8_both_layouts is False and not near.set_fraction, near
    with pytest.raises(TrainingError):  # as a check of the premise: with both, refused
        memory.plan_memory(resolve_args(TrainArgs(preset="65b", pretrained_path="none", quantize="fp8", remat="full",
                                                  fp8_both_layouts=True)),
                           LLaMAConfig.from_name("65b"), [H100_MIB * 2**20], 1, {})


def test_an_explicit_fp8_layout_choice_is_not_second_guessed():
    env = {memory.CARDS_VAR: str(H100_MIB)}
    plan = memory.prepare_device_memory(TrainArgs(preset="7b", pretrained_path="none", quantize="fp8",
                                                  fp8_both_layouts=False), None, lambda m: None, env)
    assert plan.fp8_both_layouts is None
    assert memory.prepare_device_memory(TrainArgs(preset="7b", pretrained_path="none"), None, lambda m: None,
                                        env).fp8_both_layouts is None  # not fp8: nothing to decide


def _fake_nvidia_smi(tmp_path: Path) -> dict:
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, GPU-aaaa-1111, 143771'\necho '1, GPU-bbbb-2222, 81559'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    return {"PATH": str(tmp_path)}


def test_cards_are_read_from_nvidia_smi_as_cuda_sees_them(tmp_path, monkeypatch):
    env = _fake_nvidia_smi(tmp_path)
    assert memory.visible_gpus(env) is None  # this JAX has no CUDA plugin: it would run on the CPU
    monkeypatch.setattr(memory, "jax_gpu_plugin", lambda: True)
    assert memory.visible_gpus(env) == [H200_MIB * 2**20, H100_MIB * 2**20]
    assert memory.visible_gpus({**env, "CUDA_VISIBLE_DEVICES": "1"}) == [H100_MIB * 2**20]
    assert memory.visible_gpus({**env, "CUDA_VISIBLE_DEVICES": "GPU-aaaa"}) == [H200_MIB * 2**20]
    assert memory.visible_gpus({**env, "CUDA_VISIBLE_DEVICES": ""}) is None
    assert memory.visible_gpus({**env, "JAX_PLATFORMS": "cpu"}) is None
    assert memory.visible_gpus({"PATH": str(tmp_path / "empty")}) is None
    assert memory.visible_gpus({memory.CARDS_VAR: "1000,2000"}) == [1000 * 2**20, 2000 * 2**20]


def test_train_py_decides_before_jax_starts_and_before_loading_anything():
    """train.py's own main, its loop replaced by a probe: the share is set (or the run refused)
    while JAX's backend has not started."""
    script = textwrap.dedent("""
        import os, sys
        import train
        from jax._src import xla_bridge
        from jaxlora.train import loop
        loop.run = lambda a: print("probe: backend started", xla_bridge.backends_are_initialized(), "share",
                                   os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"), "flags",
                                   repr(os.environ.get("XLA_FLAGS", "")), "both layouts", a.fp8_both_layouts)
        argv = ["--preset", "65b", "--pretrained_path", "none"]
        os.environ["JAXLORA_GPU_MEMORY_MIB"] = "81559"
        print("probe: refused with", train.main(argv), "backend started", xla_bridge.backends_are_initialized())
        os.environ["JAXLORA_GPU_MEMORY_MIB"] = "143771"
        train.main(argv)
        os.environ["XLA_FLAGS"] = "--xla_dump_to=/nowhere"
        train.main(argv + ["--quantize", "fp8"])  # FP8's GEMMs through cuBLASLt: a flag added
        os.environ["XLA_FLAGS"] = "--xla_gpu_enable_triton_gemm=true"
        train.main(argv + ["--quantize", "fp8"])  # the user's own choice stays
        os.environ["XLA_FLAGS"] = ""
        train.main(["--preset", "7b", "--pretrained_path", "none", "--quantize", "fp8"])  # 7B: both layouts
        os.environ["JAXLORA_GPU_MEMORY_MIB"] = "81559"
        train.main(argv + ["--quantize", "fp8", "--remat", "full"])  # 65B fp8 on 80 GB: one kernel layout
    """)
    env = {k: v for k, v in os.environ.items() if k != memory.FRACTION_VAR}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "probe: refused with 2 backend started False" in out.stdout, out.stdout
    assert "train.py: error: this run needs ~137.8 GiB per GPU" in out.stderr and "79.6 GiB GPU" in out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("memory:")]
    assert len(lines) == 1 and "set XLA_PYTHON_CLIENT_MEM_FRACTION=0.99" in lines[0], out.stdout
    assert "probe: backend started False share 0.99" in out.stdout, out.stdout
    probes = [line for line in out.stdout.splitlines() if line.startswith("probe: backend started False share")]
    assert probes[0].endswith("both layouts None"), probes  # not fp8: nothing decided
    # 65B fp8 on the H200: the second layout would fit only within the estimate's error
    assert probes[1].endswith("flags '--xla_dump_to=/nowhere --xla_gpu_enable_triton_gemm=false' both layouts False")
    assert probes[2].endswith("flags '--xla_gpu_enable_triton_gemm=true' both layouts False"), probes
    assert probes[3].endswith("flags '' both layouts True"), probes  # 7B fp8 on the H200: XLA's own GEMMs
    # 65B fp8 on 80 GB: the second layout would not fit at all, so cuBLAS for the one
    assert probes[4].endswith("flags '--xla_gpu_enable_triton_gemm=false' both layouts False"), probes
    assert sum(line.startswith("fp8: added --xla_gpu_enable_triton_gemm=false") for line in out.stdout.splitlines()) == 2


def test_mfu_is_the_benchs_formula():
    """The bench's logged 7B 4 x 256 figure (ours_7b_h200.log: 20,306.2 tok/s, MFU 0.5468) from the
    shared function; the peak from the device kind, or given; none for a CPU."""
    config = LLaMAConfig.from_name("7B")
    assert round(mfu(20306.2 * flops_per_token(config, 256), "NVIDIA H200", 1), 4) == 0.5468
    assert mfu(989e12, "NVIDIA H100 80GB HBM3", 2) == pytest.approx(0.5)
    assert mfu(1e12, "cpu", 1) is None and mfu(1e12, "cpu", 4, peak_tflops=1.0) == 0.25

