"""What a run costs: FLOPs per token and MFU (train.py and bench/train_throughput.py share them),
frozen-weight bytes and a per-device memory estimate (train.py's decision on the allocator's
share, `jaxlora.train.memory`, and its memory line after building)."""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.errors import TrainingError
from jaxlora.model import fp8
from jaxlora.model.nf4 import ABSMAX_BLOCK, BLOCK
from jaxlora.parallel import sharding as shd
from jaxlora.train.settings import PRECISIONS
from jaxlora.train.spec import SpeedKnobs
from jaxlora.train.steps import loss_chunk_tokens

GIB = 2**30
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


def mfu(flops_per_second: float, device_kind: str, n_devices: int, peak_tflops: float | None = None
        ) -> float | None:
    """Model FLOPs utilisation: `flops_per_second` (tokens/s x `flops_per_token`) over the dense
    bf16 peak of `n_devices` devices of `device_kind` (or `peak_tflops` each); None where the
    peak is unknown (CPUs)."""
    peak = peak_tflops * 1e12 if peak_tflops else peak_flops(device_kind)
    return flops_per_second / (peak * n_devices) if peak else None


# Bits per weight of a dense kernel quantized by --quantize (codes and block scales; int8's one
# float32 scale per output column is under 0.01 bit a weight).
QUANTIZED_BITS = {"int8": 8.0, "fp8": 8.0, "nf4": 4 + 32 / BLOCK, "nf4-dq": 4 + 8 / BLOCK + 32 / (BLOCK * ABSMAX_BLOCK)}


def weight_bytes(config: LLaMAConfig, precision: str, quantize: str = "none", fp8_both_layouts: bool = False) -> int:
    """Bytes of the frozen weights as the run stores them: the storage dtype, with the blocks'
    dense kernels at QUANTIZED_BITS under --quantize (embeddings, LM head and norms are not
    quantized; --fp8_both_layouts: a second byte a weight)."""
    itemsize = jnp.dtype(PRECISIONS[precision][1]).itemsize
    if quantize == "none":
        return config.num_params() * itemsize
    dense = config.n_layer * sum(i * o for i, o in config.dense_shapes().values())
    bits = QUANTIZED_BITS[quantize] + (8 if quantize == "fp8" and fp8_both_layouts else 0)
    return math.ceil((config.num_params() - dense) * itemsize + dense * bits / 8)


# Activations kept per token and layer for the backward pass under dots_no_batch remat, in
# vectors of the compute dtype: the products split over the tensor axis (q/k/v, the attention
# output, both MLP inputs: c_attn's width + C + 2H) and KEPT_WHOLE C-wide vectors every device
# keeps (the layer input and the two branches' outputs); and, per token of a loss chunk,
# LOGIT_ROWS float32 rows of the vocabulary (logits, their gradient, the softmax). Fitted to the
# compiled memory of 7B at 4 x 256 and 8 x 512 on one H200 (docs/benchmarks.md); checked against
# int8, nf4-dq, 65B on one and on 2 and 4 devices (tests/test_train_memory.py).
KEPT_WHOLE = 3
LOGIT_ROWS = 3
# The other policies relative to dots_no_batch (7B 8 x 512, first session: dots 27.0 GiB, none 36.7,
# dots_no_batch 24.1); full keeps only each layer's input, and one layer's products while it is redone.
REMAT_SCALE = {"dots_no_batch": 1.0, "dots": 1.28, "none": 2.2}
ADAPTER_BYTES = 20  # per adapter parameter, float32: value, gradient, accumulated gradient, AdamW's two moments


@dataclass(frozen=True)
class MemoryEstimate:
    """One device's share of a run, in bytes."""

    weights: int  # frozen weights (their shard)
    adapters: int  # adapters with gradients and optimizer state
    activations: int  # kept for the backward pass over the layers
    logits: int  # one loss chunk's float32 logits and gradients

    @property
    def total(self) -> int:
        return self.weights + self.adapters + self.activations + self.logits

    def describe(self, per: str = "") -> str:
        """'~137.8 GiB per GPU (frozen weights 121.6, ...)' with per=' per GPU'."""
        return (f"~{self.total / GIB:.1f} GiB{per} (frozen weights {self.weights / GIB:.1f}, adapters and AdamW "
                f"{self.adapters / GIB:.2f}, activations {self.activations / GIB:.1f}, logits {self.logits / GIB:.2f})")


def estimate_device_bytes(config: LLaMAConfig, lora: LoRAConfig, speed: SpeedKnobs, mesh_shape: Mapping[str, int],
                          rows: int, seq: int) -> MemoryEstimate:
    """The memory one device needs to train: its shard of the frozen weights, the adapters
    with their optimizer state, and what the step keeps for its backward pass, for `rows`
    rows of `seq` tokens a micro-batch on each batch shard, on a mesh of `mesh_shape`
    (``{"data", "fsdp", "tensor"}``: a `Mesh`'s shape, or one made up before JAX starts).

    Within 4% of the compiled step's memory of LLaMA-1 shapes with the default (dots_no_batch)
    remat on GPU; the other remat policies are rougher (REMAT_SCALE). Llama 3's 128k vocabulary
    runs above it (8B: 22.8 GiB measured at 4 x 256 against ~19.6 estimated)."""
    C, H, L = config.n_embd, config.n_hidden, config.n_layer
    tensor = mesh_shape["tensor"]
    itemsize = jnp.dtype(PRECISIONS[speed.precision][0]).itemsize
    tokens = rows * seq
    split = config.dense_shapes()[("attn", "c_attn")][1] + C + 2 * H
    per_layer = split / tensor + KEPT_WHOLE * C  # vectors kept per token
    if speed.remat == "full":
        kept = tokens * (L * C + per_layer)
    else:
        kept = tokens * L * per_layer * REMAT_SCALE.get(speed.remat, REMAT_SCALE["none"])
    chunk = loss_chunk_tokens(tokens, config.padded_vocab_size, speed.loss_chunk) or tokens
    return MemoryEstimate(
        weights=math.ceil(weight_bytes(config, speed.precision, speed.quantize, speed.fp8_both_layouts)
                          / (mesh_shape["fsdp"] * tensor)),
        adapters=ADAPTER_BYTES * lora.num_params(config),
        activations=math.ceil(kept * itemsize),
        logits=math.ceil(chunk * config.padded_vocab_size / tensor) * 4 * LOGIT_ROWS)


def fp8_speed_note(tokens_per_device: int, platform: str, compute_capability: str | None = None) -> str | None:
    """Advice when `--quantize fp8` is asked for where it was not measured faster than bf16: a GPU
    without FP8 tensor cores (compute capability below 8.9: XLA then multiplies in bf16 after a
    conversion), or micro-batches of fewer than `fp8.FASTER_FROM_TOKENS` tokens a device
    (elsewhere its products are emulated, for tests, and no speed is claimed)."""
    if platform != "gpu":
        return None
    major_minor = re.match(r"(\d+)\.(\d+)", str(compute_capability or ""))
    if major_minor and (int(major_minor[1]), int(major_minor[2])) < (8, 9):
        return (f"note: --quantize fp8 on a GPU of compute capability {compute_capability}, which has no FP8 "
                "tensor cores (Ada and Hopper have): its products run in bf16 after a conversion, slower than "
                "bf16 alone; for less memory use --quantize int8 or nf4-dq")
    if tokens_per_device >= fp8.FASTER_FROM_TOKENS:
        return None
    return (f"note: --quantize fp8 with {tokens_per_device:,} tokens a micro-batch per GPU: FP8 was measured faster "
            f"than bf16 from {fp8.FASTER_FROM_TOKENS:,} tokens (docs/benchmarks.md); below, each product's scaling "
            "weighs more and it may be slower: raise --micro_batch_size or --max_seq_length, or leave --quantize out")


def check_memory(config: LLaMAConfig, lora: LoRAConfig, speed: SpeedKnobs, mesh: Mesh, rows: int, seq: int,
                 log: Callable[[str], None]) -> None:
    """Say where the run goes and what it needs (`rows` per batch shard a micro-batch); refuse
    when the frozen weights alone cannot fit."""
    kind = next(iter(mesh.devices.flat)).device_kind
    est = estimate_device_bytes(config, lora, speed, mesh.shape, rows, seq)
    need, weights = est.total, est.weights
    have = shd.device_memory_bytes(jax.local_devices()[0])
    if have is None:  # CPU devices share the host's memory
        n = len(jax.local_devices())
        need, weights, have = need * n, weights * n, shd.host_memory_bytes()
        where = f"host memory ({n} CPU device(s))"
    else:
        where = f"memory of one {kind}"
    log(f"memory: ~{need / GIB:.1f} GiB needed of {have / GIB:.1f} GiB {where} (frozen weights "
        f"{weights / GIB:.1f} GiB)" if have else f"memory: ~{need / GIB:.1f} GiB needed")
    if have and weights > have:
        raise TrainingError(f"the frozen weights alone need {weights / GIB:.1f} GiB of {where}, which has "
                            f"{have / GIB:.1f} GiB: use more devices (--mesh with fsdp/tensor), --quantize nf4-dq, "
                            "a lower --precision storage (bf16-true), or a smaller --preset")
    if have and need > have:
        log(f"warning: the estimate ({need / GIB:.1f} GiB) exceeds {where} ({have / GIB:.1f} GiB); the run "
            "may run out of memory: lower --micro_batch_size, use --remat full, or shard over more devices")
