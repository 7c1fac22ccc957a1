"""What a generation session shows while it runs: the text as it streams, and how long a
sample took, with the time spent compiling apart from the decoding speed.

A sample's first call to a program of a new shape traces and compiles it (seconds on a
laptop CPU; 0.8 s for a 7B decode program on a GPU), which once made a single sample read
1.6 tokens/s against 566-938 once compiled. `CompileClock` counts those seconds from JAX's
own monitoring events; `SampleClock` subtracts them: time to first token is reported with
the part spent compiling the prefill, and the decoding rate leaves out compiling the decode
program (it happens after the first token, on the first decode call).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, TextIO

import jax
import numpy as np

# JAX records these durations for every program it traces, lowers and compiles (jax.monitoring)
COMPILE_EVENTS = frozenset({"/jax/core/compile/jaxpr_trace_duration",
                            "/jax/core/compile/jaxpr_to_mlir_module_duration",
                            "/jax/core/compile/backend_compile_duration"})
MIN_SHOWN_S = 1e-3  # compile time below this is not worth a mention


class CompileClock:
    """Seconds spent tracing, lowering and compiling jitted programs while it is open (a
    context manager; the listener is removed on exit)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def _on_event(self, event: str, duration: float, **_: Any) -> None:
        if event in COMPILE_EVENTS:
            self.seconds += duration

    def __enter__(self) -> CompileClock:
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        return self

    def __exit__(self, *_: object) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_event)


class SampleClock:
    """One sample's timeline: started, first token (call `first_token` from the stream),
    finished (`stop`); compile seconds before and after the first token."""

    def __init__(self, compile_clock: CompileClock, now: Callable[[], float] = time.perf_counter) -> None:
        self.clock, self.now = compile_clock, now
        self.start, self.compile_at_start = now(), compile_clock.seconds
        self.first: float | None = None
        self.compile_at_first = 0.0
        self.end, self.compile_at_end, self.n_tokens = math.nan, 0.0, 0

    def first_token(self) -> None:
        if self.first is None:
            self.first, self.compile_at_first = self.now(), self.clock.seconds

    def stop(self, n_tokens: int) -> None:
        self.first_token()  # no token streamed (none generated): the end is the first token's time
        self.end, self.compile_at_end, self.n_tokens = self.now(), self.clock.seconds, n_tokens

    @property
    def prefill_compile_s(self) -> float:
        return self.compile_at_first - self.compile_at_start

    @property
    def decode_compile_s(self) -> float:
        return self.compile_at_end - self.compile_at_first

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first per second of decoding, compiling left out (nan: none)."""
        seconds = self.end - self.first - self.decode_compile_s
        return (self.n_tokens - 1) / seconds if self.n_tokens > 1 and seconds > 0 else math.nan

    def summary(self, index: int) -> str:
        ttft = self.first - self.start
        compiling = f" ({self.prefill_compile_s:.2f} s of it compiling)" if self.prefill_compile_s >= MIN_SHOWN_S else ""
        decoding = (f", +{self.decode_compile_s:.2f} s compiling the decode program, not counted"
                    if self.decode_compile_s >= MIN_SHOWN_S else "")
        return (f"sample {index}: {self.n_tokens} tokens in {self.end - self.start:.2f} s; time to first token "
                f"{ttft:.3f} s{compiling}; then {self.decode_tok_s:.1f} tokens/s decoding{decoding}")


class TextStream:
    """Writes one sample's text to `out` as its tokens arrive (an `on_tokens` callback for
    `generate`, batch of one). Text is written only once it is stable: a token that decodes
    to part of a character (or changes how earlier pieces decode) waits for the next."""

    def __init__(self, decode: Callable[[list[int]], str], out: TextIO,
                 on_first: Callable[[], None] | None = None) -> None:
        self.decode, self.out, self.on_first = decode, out, on_first
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, rows: list[np.ndarray]) -> None:
        if self.on_first is not None:
            self.on_first()
        self.ids.extend(rows[0].tolist())
        text = self.decode(self.ids)
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text

    def finish(self, ids: list[int] | np.ndarray) -> str:
        """Writes what is left of the sample's final text and a newline; returns the text."""
        text = self.decode(list(ids))
        self.out.write(text[len(self.printed):] + "\n")
        self.out.flush()
        return text
