"""jaxlora.infer.load's checks before any weights are read: each wrong path named with its flag,
and the tokenizer found where the weights came from."""
from __future__ import annotations

from pathlib import Path

import pytest

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.infer.load import LIT_TOKENIZER, Sources, check_sources, find_tokenizer
from jaxlora.weights.jaxlora_dir import write_config


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def adapters_dir(path: Path, base: Path | str | None) -> Path:
    (path / "lora").mkdir(parents=True)
    write_config(path, LLaMAConfig.from_name("demo"), LoRAConfig(r=4), None if base is None else str(base))
    return path


@pytest.fixture
def lit_layout(tmp_path, monkeypatch):
    """lit-llama's layout: checkpoints/lit-llama/7B/lit-llama.pth, the tokenizer one folder up."""
    monkeypatch.chdir(tmp_path)
    pth = touch(tmp_path / "checkpoints/lit-llama/7B/lit-llama.pth")
    return pth, touch(tmp_path / "checkpoints/lit-llama/tokenizer.model")


def test_lit_pth_finds_the_tokenizer_one_folder_up(lit_layout):
    pth, tok = lit_layout
    assert find_tokenizer(Sources(pretrained_path=str(pth))) == tok


def test_a_tokenizer_beside_the_pth_comes_first(lit_layout):
    pth, _ = lit_layout
    beside = touch(pth.parent / "tokenizer.model")
    assert find_tokenizer(Sources(pretrained_path=str(pth))) == beside


def test_adapters_alone_follow_their_recorded_base(tmp_path):
    base = touch(tmp_path / "demo/base.pth")
    tok = touch(tmp_path / "demo/tokenizer.model")
    adapters = adapters_dir(tmp_path / "run/adapters", base)
    src = check_sources(adapters=adapters)
    assert src.pretrained_path == str(base)
    assert find_tokenizer(src) == tok
    own = touch(adapters / "tokenizer.model")  # an adapters directory's own tokenizer wins
    assert find_tokenizer(src) == own


def test_hf_or_jaxlora_directory_holds_its_tokenizer(tmp_path):
    hf = tmp_path / "hf"
    tok = touch(hf / "tokenizer.model")
    assert find_tokenizer(Sources(pretrained_path=str(hf))) == tok
    assert find_tokenizer(Sources(checkpoint_dir=str(hf))) == tok


def test_no_tokenizer_lists_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pth = touch(tmp_path / "a/b/model.pth")
    with pytest.raises(FileNotFoundError) as e:
        find_tokenizer(Sources(pretrained_path=str(pth)))
    for place in (tmp_path / "a/b/tokenizer.model", tmp_path / "a/tokenizer.model", LIT_TOKENIZER):
        assert str(place) in str(e.value)
    assert "--tokenizer_path" in str(e.value)


def test_recorded_bases_that_loop_end(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    adapters_dir(a, b)
    adapters_dir(b, a)
    with pytest.raises(FileNotFoundError):
        find_tokenizer(Sources(adapters=str(a), pretrained_path=str(b)))


@pytest.mark.parametrize("kwargs, message", [
    ({"checkpoint_dir": "x", "pretrained_path": "y"}, "not both"),
    ({"adapters": "x", "lora_path": "y"}, "not both"),
    ({}, "no model given"),
    ({"checkpoint_dir": "missing"}, "--checkpoint_dir missing: no such directory"),
    ({"pretrained_path": "missing.pth"}, "--pretrained_path missing.pth: no such file or directory"),
    ({"pretrained_path": "file.pth", "lora_path": "missing.pth"}, "--lora_path missing.pth: no such file"),
    ({"pretrained_path": "file.pth", "lora_path": "."}, "--lora_path .: a directory, not a file"),
    ({"checkpoint_dir": "file.pth"}, "a file, not a directory; a lit-llama .pth goes to --pretrained_path"),
    ({"checkpoint_dir": "."}, "not a jaxlora checkpoint directory"),
    ({"pretrained_path": "file.pth", "adapters": "."}, "--adapters .: not an adapters directory"),
])
def test_check_sources_names_the_flag_at_fault(tmp_path, monkeypatch, kwargs, message):
    monkeypatch.chdir(tmp_path)
    touch(tmp_path / "file.pth")
    with pytest.raises((ValueError, OSError)) as e:
        check_sources(**kwargs)
    assert message in str(e.value)


def test_adapters_whose_base_is_gone_say_so(tmp_path):
    adapters = adapters_dir(tmp_path / "adapters", tmp_path / "gone.pth")
    with pytest.raises(FileNotFoundError, match="config.json 'base'"):
        check_sources(adapters=adapters)
