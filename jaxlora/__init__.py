"""jaxlora: LoRA fine-tuning of LLaMA in JAX/Flax, bit-compatible with lit-llama."""
from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.model.layouts import abstract_variables, init_variables
from jaxlora.model.llama import LLaMA
from jaxlora.model.lora import MergedLoRADense, merge_lora

__all__ = ["LLaMAConfig", "LoRAConfig", "LLaMA", "MergedLoRADense", "merge_lora", "init_variables",
           "abstract_variables"]
