"""The README's Python API example runs as written."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (2, 16, namespace["config"].padded_vocab_size)
    assert set(namespace["merged"]) == set(namespace["variables"]["params"])
    import numpy as np
    np.testing.assert_allclose(np.asarray(namespace["logits_fast"]), np.asarray(namespace["logits"]), rtol=1e-5,
                               atol=1e-5)


def test_readme_first_two_commands():
    commands = [line.split("#")[0].strip() for line in README.read_text().splitlines()
                if line.startswith("pip install")]
    assert commands[0].endswith("python train.py")
    assert "pytest" in commands[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci
