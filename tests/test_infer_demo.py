"""The demo's facts as generation knows them agree with train's (the import rules for every
package, infer never importing train among them, are tests/test_house.py)."""
from __future__ import annotations

from pathlib import Path



def test_demo_facts_agree_with_the_training_demo():
    from jaxlora.config import ADAPTERS_DIR
    from jaxlora.demo import DEMO_INSTRUCTION, DEMO_OUT_DIR
    from jaxlora.infer.demo import DEMO_ADAPTERS, demo_answer
    from jaxlora.train.settings import DEMO_PROFILE
    assert DEMO_PROFILE["sample_instruction"] == DEMO_INSTRUCTION
    assert Path(DEMO_PROFILE["out_dir"]) / ADAPTERS_DIR == DEMO_ADAPTERS == DEMO_OUT_DIR / ADAPTERS_DIR
    assert demo_answer(DEMO_INSTRUCTION) == "tekcor" and demo_answer("no such instruction") is None
