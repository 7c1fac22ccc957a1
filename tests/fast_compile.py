"""The suite's XLA setting for fast compiles, which tests/conftest.py puts in XLA_FLAGS for the
test process and every subprocess it starts.

LLVM at -O0 compiles ~35% faster; the programs (HLO, its passes, sharding, collectives) are the
same, only the machine code is less optimized, and the tiny models run in milliseconds anyway.
Tests whose subprocess moves a lot of data (the memory tests) or whose tolerances were measured
on XLA's default code run it with `default_env`. JAXLORA_TEST_XLA_OPT=1 keeps the default level
everywhere.
"""
from __future__ import annotations

import os

FLAG = "--xla_backend_optimization_level=0"


def wanted() -> bool:
    return os.environ.get("JAXLORA_TEST_XLA_OPT") != "1"


def default_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with XLA's default optimization level."""
    env = dict(os.environ if env is None else env)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if f != FLAG)
    return env
