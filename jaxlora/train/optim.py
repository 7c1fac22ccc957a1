"""The optimizer: AdamW over the adapter tree, selected by label (optax.multi_transform)."""
from __future__ import annotations

import optax

from jaxlora.model.lora import trainable_labels

SCHEDULES = ("constant", "cosine", "linear")


def learning_rate_schedule(learning_rate: float, warmup_steps: int = 100, schedule: str = "constant",
                           total_steps: int | None = None, final_fraction: float = 0.1) -> optax.Schedule:
    """Linear warmup from 0 (lit-llama: lr * step / warmup, step counted from 0), then `schedule`.

    'constant' is lit-llama's; 'cosine' and 'linear' decay to final_fraction * lr at total_steps.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    warmup = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
    if schedule == "constant":
        after = optax.constant_schedule(learning_rate)
    else:
        if not total_steps or total_steps <= warmup_steps:
            raise ValueError(f"a {schedule} schedule needs total_steps > warmup_steps ({warmup_steps})")
        decay = total_steps - warmup_steps
        after = (optax.cosine_decay_schedule(learning_rate, decay, alpha=final_fraction) if schedule == "cosine"
                 else optax.linear_schedule(learning_rate, learning_rate * final_fraction, decay))
    if warmup_steps <= 0:
        return after
    return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(learning_rate: float | optax.Schedule = 3e-4, weight_decay: float = 0.01,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   grad_clip: float | None = None) -> optax.GradientTransformation:
    """AdamW as lit-llama's torch.optim.AdamW (decoupled decay 0.01, the torch default it uses).

    Adapter leaves are labelled 'train' and updated and decayed; anything else in the tree is
    'freeze' and gets a zero update and no state. Apply it to the `lora` collection only:
    frozen weights never enter the optimizer at all.
    """
    adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if grad_clip:
        adamw = optax.chain(optax.clip_by_global_norm(grad_clip), adamw)
    return optax.multi_transform({"train": adamw, "freeze": optax.set_to_zero()}, trainable_labels)
