"""The built-in demo's assets: a tiny LLaMA pretrained on `corpus.txt` (lit-llama's .pth format),
its SentencePiece tokenizer and a small instruction set (scripts/ rebuilds them)."""
from pathlib import Path

DEMO_DIR = Path(__file__).parent
DEMO_BASE = DEMO_DIR / "lit-llama-demo.pth"
DEMO_TOKENIZER = DEMO_DIR / "tokenizer.model"
DEMO_DATA = DEMO_DIR / "instructions.json"
# What `python train.py` (no flags) writes and samples, and `python generate.py` (no flags) reads and asks.
DEMO_OUT_DIR = Path("out/demo")
DEMO_INSTRUCTION = "Reverse the word rocket."
