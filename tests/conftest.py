"""Shared fixtures: tiny random lit-llama state dicts and our models built from them."""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests import the PyTorch reference by name

import fast_compile  # noqa: E402

# A suite started in the background of a non-interactive shell (`cmd &`, nohup) inherits SIGINT
# ignored, and so would train.py in the Ctrl-C tests: take Ctrl-C as a terminal would deliver it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Compile time is most of this suite's time on CPU, so, for this process and every subprocess a test
# starts (they inherit the environment; scripts that set a device count append to XLA_FLAGS):
# - LLVM at -O0 (tests/fast_compile.py says why that is safe and which tests opt out);
# - one persistent compilation cache for the session: tests (and subprocesses) that compile the same
#   program load it instead of compiling it again. A cached program is the one XLA compiled.
if fast_compile.wanted():
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + fast_compile.FLAG).strip()
_OWN_CACHE = None if "JAX_COMPILATION_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="jaxlora-test-jit-")
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from jaxlora.config import LLaMAConfig, LoRAConfig  # noqa: E402


def random_lit_state_dict(torch_model, seed: int = 0, nonzero_lora: bool = True) -> dict[str, np.ndarray]:
    """Fill every tensor of a reference model with random values (B too), return as numpy f32."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            if name.endswith("scale"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "lora_B" in name and not nonzero_lora:
                p.zero_()
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}


@pytest.fixture
def tiny_config() -> LLaMAConfig:
    return LLaMAConfig.from_name("tiny")


@pytest.fixture
def tiny_lora() -> LoRAConfig:
    return LoRAConfig(r=4, alpha=16, dropout=0.0, targets=("q", "v"))


def pytest_sessionfinish(session, exitstatus) -> None:
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
