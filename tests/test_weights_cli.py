"""The converters as a user meets them (issue 20): outputs readable by others, the demo's PEFT
folder back in one step, help that matches the code, errors that name the real problem."""
from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from jaxlora.config import LoRAConfig
from jaxlora.weights import jaxlora_dir as cio
from jaxlora.weights.hf_files import save_peft_adapters
from jaxlora.weights.lit_files import save_lit_lora

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "convert"), str(ROOT / "tests")]

import from_hf  # noqa: E402
import from_lit_llama  # noqa: E402
import from_peft  # noqa: E402
import to_hf  # noqa: E402
import to_lit_llama  # noqa: E402
import to_peft  # noqa: E402
from test_convert import TINY, save_lit, tiny_variables  # noqa: E402

LORA = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q", "v"))


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(path: Path) -> dict[str, str]:
    """{relative path: octal mode} of path and everything under it."""
    found = [path, *path.rglob("*")] if path.is_dir() else [path]
    return {str(p.relative_to(path.parent)): oct(stat.S_IMODE(p.stat().st_mode)) for p in found}


def assert_plain_modes(path: Path) -> None:
    want = {"dir": "0o755", "file": "0o644"}
    wrong = {p: m for p, m in modes(path).items()
             if m != want["dir" if (path.parent / p).is_dir() else "file"]}
    assert not wrong, f"{path}: not what a plain write gives under umask 022: {wrong}"


def test_every_converter_output_is_readable_by_others(tmp_path, umask_022):
    base_pth, lora_pth, *_ = save_lit(tmp_path / "lit", LORA)
    ck, hf_dir, peft_dir = tmp_path / "ck", tmp_path / "hf", tmp_path / "peft"
    steps = [
        (from_lit_llama, ["--checkpoint_path", str(base_pth), "--lora_path", str(lora_pth), "--out_dir", str(ck)], ck),
        (to_lit_llama, ["--checkpoint_dir", str(ck), "--out", str(tmp_path / "lora.pth")], tmp_path / "lora.pth"),
        (to_lit_llama, ["--checkpoint_dir", str(ck), "--merged", "--out", str(tmp_path / "m.pth")], tmp_path / "m.pth"),
        (to_hf, ["--checkpoint_dir", str(ck), "--merged", "--out_dir", str(hf_dir)], hf_dir),
        (from_hf, ["--hf_dir", str(hf_dir), "--out_dir", str(tmp_path / "ck2")], tmp_path / "ck2"),
        (to_peft, ["--checkpoint_dir", str(ck), "--out_dir", str(peft_dir)], peft_dir),
        (from_peft, ["--peft_dir", str(peft_dir), "--base", str(ck), "--out_dir", str(tmp_path / "a")], tmp_path / "a"),
    ]
    for module, args, out in steps:
        assert module.main([*args, *(["--quiet"] if module not in (to_peft, from_peft) else [])]) == 0, module
        assert_plain_modes(out)


def test_what_train_writes_through_weights_is_readable_by_others(tmp_path, umask_022):
    variables = tiny_variables(LORA)
    cio.save_checkpoint(tmp_path / "adapters", TINY, LORA, None, variables["lora"], base="base")
    save_peft_adapters(variables["lora"], TINY, LORA, tmp_path / "peft")
    save_lit_lora(variables["lora"], TINY, LORA, tmp_path / "out" / "lit-llama-lora-finetuned.pth")
    for out in ("adapters", "peft", "out"):
        assert_plain_modes(tmp_path / out)


def test_demo_peft_folder_comes_back_in_one_step(tmp_path):
    """A PEFT folder of adapters trained on a lit-llama .pth records that file as its base, and
    from_peft finds it there (or takes it as --base)."""
    base_pth, *_ = save_lit(tmp_path / "lit", LoRAConfig(r=0))
    variables = tiny_variables(LORA)
    cio.save_checkpoint(tmp_path / "adapters", TINY, LORA, None, variables["lora"], base=str(base_pth))
    assert to_peft.main(["--checkpoint_dir", str(tmp_path / "adapters"), "--out_dir", str(tmp_path / "peft")]) == 0
    recorded = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(base_pth.absolute())
    assert from_peft.main(["--peft_dir", str(tmp_path / "peft"), "--out_dir", str(tmp_path / "back")]) == 0
    assert from_peft.main(["--peft_dir", str(tmp_path / "peft"), "--base", str(base_pth),
                           "--out_dir", str(tmp_path / "back2")]) == 0
    assert cio.read_config(tmp_path / "back") == cio.read_config(tmp_path / "back2") == (TINY, LORA)


def test_from_hf_help_matches_the_code(capsys):
    with pytest.raises(SystemExit):
        from_hf.main(["--help"])
    text = capsys.readouterr().out
    assert "rms_norm_eps other than" not in text and "rope_theta other than" not in text
    assert "rms_norm_eps and\nrope_theta are read" in text or "rms_norm_eps and rope_theta are read" in text
    assert "local" in text and "not a Hub id" in text
    assert "  " not in text.split("python convert/from_hf.py", 1)[1].split("\n", 1)[0]  # no run of spaces


def test_converter_errors_name_the_real_problem(tmp_path, capsys):
    variables = tiny_variables(LORA)
    adapters = tmp_path / "adapters"
    cio.save_checkpoint(adapters, TINY, LORA, None, variables["lora"], base="base")
    cases = [
        (to_hf, ["--checkpoint_dir", str(adapters), "--out_dir", str(tmp_path / "o1")],
         ["adapters-only directory", "--adapters"]),
        (to_peft, ["--checkpoint_dir", str(ROOT / "README.md"), "--out_dir", str(tmp_path / "o2")],
         ["README.md: a file, not a directory"]),
        (to_lit_llama, ["--checkpoint_dir", str(ROOT / "README.md"), "--out", str(tmp_path / "o3.pth")],
         ["README.md: a file that is not a PyTorch .pth", "jaxlora checkpoint directory"]),
        (from_hf, ["--hf_dir", "meta-llama/Llama-2-7b-hf", "--out_dir", str(tmp_path / "o4"), "--quiet"],
         ["no such directory", "Hub id", "only local directories"]),
    ]
    for module, args, wanted in cases:
        assert module.main(args) == 2, module
        err = capsys.readouterr().err
        assert all(w in err for w in wanted), (module, err)
        assert not any(p.name.startswith("o") for p in tmp_path.iterdir() if p.name != "adapters")
