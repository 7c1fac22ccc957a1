"""`python generate.py` with no model flags: the built-in demo (jaxlora/demo) and what to tell
a new user about it: the instruction it answers, the right answer, and that the model is tiny."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from jaxlora.config import ADAPTERS_DIR, LLaMAConfig
from jaxlora.demo import DEMO_DATA, DEMO_OUT_DIR

DEMO_ADAPTERS = DEMO_OUT_DIR / ADAPTERS_DIR  # what `python train.py` (no flags) leaves


@lru_cache(maxsize=1)
def _demo_answers() -> dict[tuple[str, str], str]:
    records = json.loads(Path(DEMO_DATA).read_text())
    return {(r["instruction"], r.get("input", "")): r["output"] for r in records}


def demo_answer(instruction: str, input_text: str = "") -> str | None:
    """The demo data's answer to this instruction (and input), if it holds one."""
    return _demo_answers().get((instruction, input_text))


def demo_note(instruction: str, input_text: str, has_adapters: bool) -> str:
    """What the demo says on stderr before it answers."""
    c = LLaMAConfig.from_name("demo")
    answer = demo_answer(instruction, input_text)
    lines = [(f"demo: a tiny LLaMA ({c.n_layer} layers, {c.n_embd} wide, a {c.vocab_size}-piece vocabulary) "
              "pretrained on jaxlora/demo/corpus.txt in minutes on a CPU: expect wrong answers")]
    if answer is not None:
        lines.append(f"demo: the right answer is {answer!r}")
    if not has_adapters:
        lines.append(f"demo: base model only ({DEMO_ADAPTERS} not found: run `python train.py` first for the "
                     "fine-tuned adapters)")
    return "\n".join(lines)
