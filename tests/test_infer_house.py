"""jaxlora.infer's place in the house: it never imports train; small functions, no private
names from other modules, no function-local imports; the demo's facts agree with train's."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

INFER = Path(__file__).resolve().parents[1] / "jaxlora" / "infer"
MAX_LINES = 80


def test_infer_never_imports_train():
    code = ("import sys, jaxlora.infer.session, jaxlora.infer.demo, jaxlora.infer.report; "
            "print(sorted(m for m in sys.modules if m.startswith('jaxlora.train')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=INFER.parents[1]).stdout
    assert out.strip() == "[]", out


def test_functions_short_imports_at_the_top_and_public():
    for path in sorted(INFER.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= MAX_LINES, f"{path.name}:{node.name}"
                inner = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
                assert not inner, f"{path.name}:{node.name} imports inside a function"
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxlora"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports private {private} from {node.module}"


def test_demo_facts_agree_with_the_training_demo():
    from jaxlora.config import ADAPTERS_DIR
    from jaxlora.demo import DEMO_INSTRUCTION, DEMO_OUT_DIR
    from jaxlora.infer.demo import DEMO_ADAPTERS, demo_answer
    from jaxlora.train.settings import DEMO_PROFILE
    assert DEMO_PROFILE["sample_instruction"] == DEMO_INSTRUCTION
    assert Path(DEMO_PROFILE["out_dir"]) / ADAPTERS_DIR == DEMO_ADAPTERS == DEMO_OUT_DIR / ADAPTERS_DIR
    assert demo_answer(DEMO_INSTRUCTION) == "tekcor" and demo_answer("no such instruction") is None
