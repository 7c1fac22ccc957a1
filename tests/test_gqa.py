"""Model-level facts of the modern LLaMA family that need no reference library."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.model.layouts import init_variables, qkv_columns
from jaxlora.model.llama import LLaMA, lm_head_kernel
from jaxlora.train.steps import token_nll_sum


def test_llama3_vocabulary_loss_is_formed_in_small_chunks():
    """With the GPU profile's loss_chunk (4096 tokens), a 128,256-word head forms its float32
    logits ~1k tokens at a time, never for the whole 2 x 1024-token batch: two chunks of 1,024
    (5% over MAX_CHUNK_LOGITS's 1,021 tokens at most, rather than 3 chunks with 1,015 rows of padding)."""
    hidden = jax.ShapeDtypeStruct((2, 1024, 8), jnp.bfloat16)
    kernel = jax.ShapeDtypeStruct((8, 128256), jnp.bfloat16)
    targets = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
    hlo = jax.jit(lambda h, k, t: token_nll_sum(h, k, t, 4096)).lower(hidden, kernel, targets).as_text()
    assert "1024x128256xf32" in hlo and "2048x128256xf32" not in hlo and "1021x" not in hlo


def test_tied_model_has_no_lm_head_and_reads_the_table():
    config = LLaMAConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=32, vocab_size=64, tie_embeddings=True)
    model = LLaMA(config, LoRAConfig(r=2, targets=("q", "v")))
    variables = init_variables(model, jax.random.key(0))
    assert "lm_head" not in variables["params"]
    assert config.num_params() == sum(x.size for x in jax.tree.leaves(variables["params"]))
    kernel = variables["params"]["h"]["attn"]["c_attn"]["kernel"]
    assert kernel.shape == (1, 32, 32 + 2 * 16) and qkv_columns(config) == {"q": (0, 32), "k": (32, 48), "v": (48, 64)}
    lora_b = variables["lora"]["h"]["attn"]["c_attn"]["lora_B"]
    assert lora_b.shape == (1, 2, 2, 32)  # q and v, as wide as q (v uses its first 16 columns)
    ids = jnp.arange(6)[None] % 64
    hidden = model.apply(variables, ids, return_hidden=True)
    logits = model.apply(variables, ids)
    np.testing.assert_allclose(logits, hidden @ lm_head_kernel(variables["params"]), rtol=1e-5, atol=1e-5)
