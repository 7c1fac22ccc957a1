"""jaxlora.infer.report: compile time counted apart from decoding, and the streaming printer."""
from __future__ import annotations

import io
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.infer.report import CompileClock, SampleClock, TextStream


def test_compile_clock_counts_compiling_only_while_open():
    f = jax.jit(lambda x: jnp.cos(x) * 3 + 1)
    with CompileClock() as clock:
        f(jnp.ones(17)).block_until_ready()
        compiled = clock.seconds
        assert compiled > 0
        f(jnp.ones(17)).block_until_ready()  # cached: nothing more
        assert clock.seconds == compiled
    jax.jit(lambda x: x - 2)(jnp.ones(5)).block_until_ready()  # closed: not counted
    assert clock.seconds == compiled


class FakeCompileClock:
    seconds = 0.0


def test_sample_clock_leaves_compiling_out_of_the_decoding_rate():
    compile_clock, t = FakeCompileClock(), [0.0]
    clock = SampleClock(compile_clock, now=lambda: t[0])
    compile_clock.seconds, t[0] = 0.9, 1.0  # prefill: 0.9 s compiling + 0.1 s running
    clock.first_token()
    clock.first_token()  # later chunks do not move it
    compile_clock.seconds, t[0] = 2.4, 3.0  # decode: 1.5 s compiling, 0.5 s for 50 more tokens
    clock.stop(51)
    assert clock.prefill_compile_s == 0.9 and math.isclose(clock.decode_compile_s, 1.5)
    assert math.isclose(clock.decode_tok_s, 100.0)
    line = clock.summary(1)
    assert "time to first token 1.000 s (0.90 s of it compiling)" in line
    assert "100.0 tokens/s decoding, +1.50 s compiling the decode program, not counted" in line


def test_sample_clock_without_compiling_says_nothing_of_it():
    compile_clock, t = FakeCompileClock(), [0.0]
    clock = SampleClock(compile_clock, now=lambda: t[0])
    t[0] = 0.01
    clock.first_token()
    t[0] = 0.11
    clock.stop(11)
    assert "compiling" not in clock.summary(2) and "100.0 tokens/s" in clock.summary(2)
    one = SampleClock(compile_clock, now=lambda: 5.0)
    one.stop(1)  # a single token: no rate
    assert "nan tokens/s" in one.summary(1)


def test_text_stream_writes_only_stable_text_then_the_rest():
    pieces = {1: "he", 2: "llo", 3: "\ufffd"}  # 3: half a character until 4 arrives

    def decode(ids: list[int]) -> str:
        return "hello é" if 4 in ids else "".join(pieces[i] for i in ids).replace("\ufffd", "")
    out, firsts = io.StringIO(), []
    stream = TextStream(decode, out, on_first=lambda: firsts.append(1))
    stream([np.array([1, 2])])
    assert out.getvalue() == "hello"
    stream([np.array([], np.int32)])
    assert stream.finish([1, 2, 3, 4]) == "hello é"
    assert out.getvalue() == "hello é\n" and len(firsts) == 2
