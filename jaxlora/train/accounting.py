"""What a run costs: FLOPs per token and the devices' peak (for MFU), weight bytes and a
per-device memory estimate."""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.errors import TrainingError
from jaxlora.parallel import sharding as shd
from jaxlora.train.settings import PRECISIONS

# Dense bf16 peak of one device, for MFU (datasheet numbers; None where unknown, e.g. CPUs).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L4": 121.0, "TPU v4": 275.0,
               "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0}


def peak_flops(device_kind: str) -> float | None:
    """FLOP/s of one device of this kind (the longest matching name in PEAK_TFLOPS)."""
    hits = [k for k in PEAK_TFLOPS if k.lower() in device_kind.lower()]
    return PEAK_TFLOPS[max(hits, key=len)] * 1e12 if hits else None


def flops_per_token(config: LLaMAConfig, seq_len: int) -> float:
    """Training FLOPs per token of a LoRA step (adapter matmuls ignored: < 0.3% at r=8):

    4 * N_dense              frozen matmuls: forward 2N, input gradients 2N (no weight
                             gradients); N_dense = all parameters but the embedding table
    + 6 * n_layer * T * C    attention scores and values: forward 4*T*C per layer, halved
                             for causality, x3 for forward + backward
    """
    n_dense = config.num_params() - config.padded_vocab_size * config.n_embd
    return 4 * n_dense + 6 * config.n_layer * seq_len * config.n_embd


def weight_bytes(config: LLaMAConfig, precision: str) -> int:
    """Bytes of the frozen weights in the run's storage dtype."""
    return config.num_params() * jnp.dtype(PRECISIONS[precision][1]).itemsize


def estimate_device_bytes(config: LLaMAConfig, lora: LoRAConfig, precision: str, mesh: Mesh, micro_rows: int,
                          seq: int, remat: str) -> int:
    """A rough per-device memory need: the weight shards, adapters with AdamW state, and the
    activations kept for the backward pass (what the H100 measurements in docs/benchmarks.md
    show within ~20%)."""
    weight_shards = mesh.shape["fsdp"] * mesh.shape["tensor"]
    rows = micro_rows // shd.batch_shards(mesh)
    itemsize = jnp.dtype(PRECISIONS[precision][0]).itemsize
    per_token_layer = {"none": 24, "dots": 12, "dots_no_batch": 10, "full": 1}.get(remat, 24)
    act = rows * seq * config.n_layer * config.n_embd * itemsize * per_token_layer // max(mesh.shape["tensor"], 1)
    logits = rows * seq * config.padded_vocab_size * 4 * 2 // max(mesh.shape["tensor"], 1)
    return math.ceil(weight_bytes(config, precision) / weight_shards) + 16 * lora.num_params(config) + act + logits


def check_memory(config: LLaMAConfig, lora: LoRAConfig, precision: str, mesh: Mesh, micro_rows: int, seq: int,
                 remat: str, log: Callable[[str], None]) -> None:
    """Say where the run goes and what it needs; refuse when the frozen weights alone cannot fit."""
    kind = next(iter(mesh.devices.flat)).device_kind
    need = estimate_device_bytes(config, lora, precision, mesh, micro_rows, seq, remat)
    weights = weight_bytes(config, precision) / (mesh.shape["fsdp"] * mesh.shape["tensor"])
    have = shd.device_memory_bytes(jax.local_devices()[0])
    if have is None:  # CPU devices share the host's memory
        n = len(jax.local_devices())
        need, weights, have = need * n, weights * n, shd.host_memory_bytes()
        where = f"host memory ({n} CPU device(s))"
    else:
        where = f"memory of one {kind}"
    log(f"memory: ~{need / 2**30:.1f} GiB needed of {have / 2**30:.1f} GiB {where} (frozen weights "
        f"{weights / 2**30:.1f} GiB)" if have else f"memory: ~{need / 2**30:.1f} GiB needed")
    if have and weights > have:
        raise TrainingError(f"the frozen weights alone need {weights / 2**30:.1f} GiB of {where}, which has "
                            f"{have / 2**30:.1f} GiB: use more devices (--mesh with fsdp/tensor), a lower "
                            "--precision storage (bf16-true), or a smaller --preset")
    if have and need > have:
        log(f"warning: the estimate ({need / 2**30:.1f} GiB) exceeds {where} ({have / 2**30:.1f} GiB); the run "
            "may run out of memory: lower --micro_batch_size, use --remat full, or shard over more devices")
