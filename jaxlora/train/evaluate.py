"""How a run measures its adapters: validation loss, exact match on held-out prompts, a few
shown samples, and the fixed sample instruction answered at every evaluation (greedy
decoding with `jaxlora.infer.decode.greedy_generate`, the same model and frozen weights)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from jaxlora.infer.decode import greedy_generate
from jaxlora.text.prompts import PromptStyle, encode_prompt
from jaxlora.text.tokenizer import TextTokenizer
from jaxlora.train.build import Run
from jaxlora.train.data import eval_batches
from jaxlora.train.settings import TrainArgs

__all__ = ["Evaluation", "Evaluator", "diverse"]


@dataclass
class Evaluation:
    """One evaluation's numbers (None: not measured)."""

    val_loss: float | None
    exact_match: float | None = None
    samples: list[dict[str, str]] = field(default_factory=list)
    sample: str | None = None  # the answer to the fixed sample instruction
    full: bool = False  # exact match and samples measured

    def row(self, step: int) -> dict[str, Any]:
        """Its metrics.jsonl row."""
        row = {"type": "eval", "step": step, "val_loss": self.val_loss}
        if self.full:
            row["exact_match"] = self.exact_match
        return {**row, "sample": self.sample}


def diverse(samples: Sequence[dict], n: int) -> list[dict]:
    """Up to n samples, preferring different instructions (by first word), in data order."""
    if n <= 0:  # the slice below would count from the end
        return []
    picked, seen = [], set()
    for s in samples:
        key = s.get("instruction", "").split(" ")[0]
        if key not in seen:
            picked.append(s)
            seen.add(key)
        if len(picked) == n:
            return picked
    rest = [s for s in samples if not any(s is p for p in picked)]
    return picked + rest[:n - len(picked)]


class Evaluator:
    """Evaluates adapters of run `r` on the validation samples, as settings `a` say."""

    def __init__(self, r: Run, tokenizer: TextTokenizer, style: PromptStyle, val_samples: Sequence[dict],
                 a: TrainArgs, buckets: Sequence[int]) -> None:
        self.r, self.tokenizer, self.buckets = r, tokenizer, tuple(buckets)
        self.stop_ids = style.stop_ids(tokenizer)  # the style's end of a response, and every EOS
        self.max_seq_length, self.max_new_tokens = a.max_seq_length, a.max_new_tokens
        self.val_eval = list(val_samples[:a.eval_iters * r.micro_rows])
        self.em_samples = list(val_samples[:a.exact_match_samples]) if a.exact_match_samples else []
        self.shown = diverse(self.em_samples if self.em_samples else val_samples, a.num_samples)
        self.sample_ids = None
        if a.sample_instruction:
            keep = r.config.block_size - a.max_new_tokens
            self.sample_ids = encode_prompt(style.render({"instruction": a.sample_instruction}), tokenizer)[-keep:]

    def __call__(self, lora: Any, full: bool) -> Evaluation:
        """Validation loss and the fixed sample; with `full`, exact match and shown samples too."""
        em, samples = self.task_eval(lora) if full else (None, [])
        return Evaluation(self.val_loss(lora), em, samples, self.fixed_sample(lora), full)

    def val_loss(self, lora: Any) -> float | None:
        """Mean loss per token over the first eval_iters validation micro-batches."""
        if not self.val_eval:
            return None
        total, count = jnp.zeros(()), jnp.zeros((), jnp.int32)
        for b in eval_batches(self.val_eval, self.r.micro_rows, self.max_seq_length, self.buckets):
            s, c = self.r.eval_step(lora, self.r.params, self.r.eval_batch({k: v[0] for k, v in b.items()}))
            total, count = total + s, count + c
        return float(total) / max(int(count), 1)

    def responses(self, lora: Any, samples: Sequence[dict]) -> list[str]:
        """Greedy answers to the samples' prompts."""
        if not samples:
            return []
        outs = greedy_generate(self.r.model, {"params": self.r.params, "lora": lora},
                               [s["input_ids_no_response"] for s in samples], self.max_new_tokens,
                               self.stop_ids, vocab_size=self.tokenizer.vocab_size)
        return [self.tokenizer.decode(o).strip() for o in outs]

    def task_eval(self, lora: Any) -> tuple[float | None, list[dict[str, str]]]:
        """Exact match on held-out prompts, and the shown samples (from the same generations)."""
        pool = self.em_samples + [s for s in self.shown if not any(s is e for e in self.em_samples)]
        got = self.responses(lora, pool)
        em = (float(np.mean([g == s["output"].strip() for g, s in zip(got, self.em_samples)]))
              if self.em_samples else None)
        by_id = {id(s): g for s, g in zip(pool, got)}
        samples = [{"instruction": s["instruction"], "input": s.get("input", ""), "expected": s.get("output", ""),
                    "response": by_id[id(s)]} for s in self.shown]
        return em, samples

    def fixed_sample(self, lora: Any) -> str | None:
        """The answer to --sample_instruction (None when there is none)."""
        if self.sample_ids is None:
            return None
        out_ids = greedy_generate(self.r.model, {"params": self.r.params, "lora": lora}, self.sample_ids,
                                  self.max_new_tokens, self.stop_ids, vocab_size=self.tokenizer.vocab_size)
        return self.tokenizer.decode(out_ids).strip()
