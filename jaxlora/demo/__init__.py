"""The built-in demo's assets: a tiny LLaMA pretrained on `corpus.txt` (lit-llama's .pth format),
its SentencePiece tokenizer and a small instruction set (scripts/ rebuilds them)."""
from pathlib import Path

DEMO_DIR = Path(__file__).parent
DEMO_BASE = DEMO_DIR / "lit-llama-demo.pth"
DEMO_TOKENIZER = DEMO_DIR / "tokenizer.model"
DEMO_DATA = DEMO_DIR / "instructions.json"
