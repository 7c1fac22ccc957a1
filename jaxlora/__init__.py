"""jaxlora: LoRA fine-tuning of LLaMA in JAX/Flax, bit-compatible with lit-llama."""
from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.lora import MergedLoRADense, merge_lora
from jaxlora.model import LLaMA, abstract_variables, init_variables

__all__ = ["LLaMAConfig", "LoRAConfig", "LLaMA", "MergedLoRADense", "merge_lora", "init_variables",
           "abstract_variables"]
