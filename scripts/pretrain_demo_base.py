"""Pretrain the tiny base model shipped for the built-in demo (full-parameter, CPU-friendly).

Trains a LLaMA of the 'demo' preset (4 layers, 4 heads, n_embd 128, vocab 1024; ~1.3 M
parameters) from scratch with plain AdamW over every weight, and saves it as a lit-llama
base checkpoint ``jaxlora/demo/lit-llama-demo.pth`` (float32, ~5 MB).

What the base reads:

- ``jaxlora/demo/corpus.txt``: the demo's facts and skills (reversed words, sums, capitals,
  sorted letters, ...) as plain sentences;
- the *training* records of ``jaxlora/demo/instructions.json`` (the split ``train.py`` makes
  for the demo: seed 42, 200 held out; the held-out records are never seen) in a plain
  question/answer layout, ``Q: <instruction> (<input>)\nA:<output>``.

It never sees the Alpaca template. A real base model has read plenty of Q&A-like text; this
one has too, in miniature. LoRA fine-tuning (``python train.py``) then has something real to
do: teach the model lit-llama's template (the answer follows "### Response:" directly and
ends with EOS) and carry what the base knows over to it; before fine-tuning the base rambles
on after the template (0% exact match), after it answers held-out prompts.

Texts are tokenized with BOS/EOS, shuffled, concatenated and cut into ``--seq_len`` windows;
each step draws a random batch of windows. Seeded: a rerun on the same machine gives the
same weights. About 10 minutes on a 2-core CPU with the defaults.

Usage: ``python scripts/pretrain_demo_base.py [--steps 1250] [--out jaxlora/demo/lit-llama-demo.pth]``
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxlora.config import LLaMAConfig  # noqa: E402
from jaxlora.demo import DEMO_DIR  # noqa: E402
from jaxlora.model.layouts import init_variables  # noqa: E402
from jaxlora.model.llama import LLaMA  # noqa: E402
from jaxlora.text.tokenizer import Tokenizer  # noqa: E402
from jaxlora.train.data import load_records, split_records  # noqa: E402
from jaxlora.train.settings import DEMO_PROFILE  # noqa: E402
from jaxlora.train.steps import shift_targets, token_nll_sum  # noqa: E402
from jaxlora.weights.lit_files import save_lit_base  # noqa: E402

DEFAULT_OUT = DEMO_DIR / "lit-llama-demo.pth"


def qa_text(record: dict) -> str:
    """A training record in a plain question/answer layout (not the Alpaca template)."""
    question = record["instruction"] + (f" ({record['input']})" if record.get("input") else "")
    return f"Q: {question}\nA:{record['output']}"


def pretraining_texts(corpus: Path, instructions: Path | None, val_size: int) -> list[str]:
    """Corpus lines, plus the demo's *training* records as Q/A text (held-out records excluded)."""
    texts = [line for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    if instructions is not None:
        train, _ = split_records(load_records(instructions), val_size, seed=42)  # the split train.py makes
        texts += [qa_text(r) for r in train]
    return texts


def token_stream(texts: list[str], tokenizer: Tokenizer, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(len(texts))
    return np.concatenate([tokenizer.encode(texts[i], bos=True, eos=True) for i in order]).astype(np.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--corpus", type=Path, default=DEMO_DIR / "corpus.txt")
    parser.add_argument("--instructions", type=Path, default=DEMO_DIR / "instructions.json",
                        help="Alpaca records whose training split is added as Q/A text ('none': corpus only)")
    parser.add_argument("--val_size", type=int, default=DEMO_PROFILE["val_size"],
                        help="held-out records excluded, as train.py's demo split (seed 42)")
    parser.add_argument("--tokenizer", type=Path, default=DEMO_DIR / "tokenizer.model")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=1250)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--warmup_steps", type=int, default=100)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tokenizer = Tokenizer(args.tokenizer)
    config = LLaMAConfig.from_name(args.preset)
    if tokenizer.vocab_size > config.vocab_size:
        raise SystemExit(f"{args.tokenizer}: vocab {tokenizer.vocab_size} > preset vocab {config.vocab_size}")
    instructions = None if str(args.instructions).lower() == "none" else args.instructions
    texts = pretraining_texts(args.corpus, instructions, args.val_size)
    stream = token_stream(texts, tokenizer, args.seed)
    n_windows = (len(stream) - 1) // args.seq_len
    print(f"{len(texts):,} texts, {len(stream):,} tokens; model {args.preset}: {config.num_params():,} parameters")

    model = LLaMA(config, scan_unroll=config.n_layer)  # unrolled layers: faster on CPU
    params = init_variables(model, jax.random.key(args.seed))["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.learning_rate, args.warmup_steps, args.steps,
                                                  end_value=args.learning_rate * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=args.weight_decay))
    opt_state = optimizer.init(params)

    def loss_fn(params, ids):
        hidden = model.apply({"params": params}, ids, return_hidden=True)
        total, count = token_nll_sum(hidden, params["lm_head"]["kernel"], shift_targets(ids))
        return total / count

    @jax.jit
    def step(params, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(args.seed)
    start, ema = time.time(), None
    for i in range(1, args.steps + 1):
        offsets = rng.integers(0, len(stream) - args.seq_len, args.batch_size)
        ids = np.stack([stream[o:o + args.seq_len] for o in offsets])
        params, opt_state, loss = step(params, opt_state, ids)
        if i % 100 == 0 or i == args.steps:
            loss = float(loss)
            ema = loss if ema is None else 0.7 * ema + 0.3 * loss
            print(f"step {i:5d}  loss {loss:.4f}  (avg {ema:.4f})  lr {float(schedule(i)):.2e}  "
                  f"{time.time() - start:.0f}s", flush=True)
    print(f"{args.steps} steps ({args.steps * args.batch_size * args.seq_len / max(n_windows * args.seq_len, 1):.1f} "
          f"passes over the corpus) in {time.time() - start:.0f}s")

    # A few greedy completions, to see what the base knows.
    from jaxlora.infer.decode import greedy_generate
    for text in ["The reverse of planet is", "23 plus 19 is", "The capital of Kenya is",
                 "The letters q e j f in order are", "Q: Reverse the word (rocket)\nA:"]:
        out = greedy_generate(model, {"params": params}, tokenizer.encode(text, bos=True), 12, tokenizer.eos_id)
        print(f"  {text!r} -> {tokenizer.decode(out)!r}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_lit_base(params, config, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
