"""Every error type jaxlora raises on purpose, and the one map from errors to exit codes that
train.py, generate.py and the converters share.

Bad input (files, keys, shapes, settings) is a ValueError or an OSError and ends a command with
exit code 2 and a message naming what is at fault; a diverged run ends with 1; Ctrl-C with 130.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable

EXIT_OK, EXIT_DIVERGED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class CheckpointError(ValueError):
    """A checkpoint (a converted jaxlora directory or a training checkpoint) is missing,
    incomplete, unreadable, or does not fit the model or run that reads it."""


class StateDictError(ValueError):
    """A state dict does not match the expected keys or shapes."""


class LitLoRATargetsError(StateDictError):
    """Adapters on targets other than exactly q, v: lit-llama's LoRA file cannot hold them."""


class HFConfigError(ValueError):
    """An HF config.json or PEFT adapter_config.json describes something jaxlora does not support."""


class LitgptConfigError(ValueError):
    """A litgpt model_config.yaml or hyperparameters.yaml describes something jaxlora does not
    compute (a non-LLaMA architecture, a LoRA on the LM head), or adapters that litgpt's LoRA
    switches cannot express; the message names the file and the key."""


class TokenizerError(ValueError):
    """A tokenizer file (tokenizer.model, tokenizer.json, tokenizer_config.json,
    generation_config.json, a chat template) is unreadable, or lacks a token a prompt style
    needs; the message names the file."""


class DataError(ValueError):
    """A data file or record is malformed; the message names the file and the place."""


class MeshError(ValueError):
    """A mesh that does not fit the devices or the model."""


class TrainingError(RuntimeError):
    """The run cannot go on (bad settings for a resumed run, nothing to train on, ...)."""


class NonFiniteLossError(TrainingError):
    """The loss or gradient norm became NaN or infinite; nothing from that step was saved."""


class InputsError(FileNotFoundError):
    """One or more input files are missing; the message lists each with how to get it."""


# What a command reports as the user's mistake (no traceback). ImportError: an optional
# dependency is missing (torch for .pth output, matplotlib for plots); the message says which.
USER_ERRORS = (ValueError, OSError, ImportError, TrainingError)


def exit_code(error: BaseException) -> int | None:
    """The exit code for an error a command ended with; None for a bug (re-raise it)."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, NonFiniteLossError):
        return EXIT_DIVERGED
    if isinstance(error, USER_ERRORS):
        return EXIT_BAD_INPUT
    return None


def run_command(prog: str, action: Callable[[], int | None], on_interrupt: str | None = None) -> int:
    """Run a command's action: its return value (None: 0) is the exit code; an error ends it
    with the code `exit_code` gives and one line on stderr."""
    try:
        return action() or EXIT_OK
    except BaseException as e:
        code = exit_code(e)
        if code is None:
            raise
        if code == EXIT_INTERRUPTED:
            if on_interrupt:
                print(f"{prog}: {on_interrupt}", file=sys.stderr)
        else:
            print(f"{prog}: error: {e}", file=sys.stderr)
        return code
