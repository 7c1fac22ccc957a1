"""Mappings between jaxlora variable trees and other formats (lit-llama; later HF/PEFT)."""
