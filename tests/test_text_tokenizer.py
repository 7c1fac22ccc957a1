"""jaxlora.text.tokenizer: Hugging Face tokenizer.json files (a Llama 3-style byte-level BPE of
128,256 ids, a Llama 2-style Metaspace BPE) encode and decode exactly as transformers' fast
tokenizer; BOS/EOS come from the model's files; open_tokenizer picks the file a directory holds.
The tokenizers are built here with the `tokenizers` library's own trainer (no downloads)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from jaxlora.errors import TokenizerError
from jaxlora.text.tokenizer import HFTokenizer, ModelFiles, open_tokenizer
from jaxlora.text.tokenizer import Tokenizer as SentencePieceTokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO_TOKENIZER = ROOT / "jaxlora" / "demo" / "tokenizer.model"

CORPUS = [
    "Hello world, how are you today? I'm fine, thanks; don't worry.",
    "Ünïcödé text: café, naïve, 日本語のテキスト, emoji 🌍🚀 and numbers 1234567.",
    "  leading spaces\n\nnew paragraphs\ttabs   and   runs of spaces  ",
    "def f(x):\n    return x * 2  # code\n",
    "Reverse the word rocket. The answer is tekcor.",
]
# Llama 3's pre-tokenizer split (its published regex), then bytes as characters
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_BASE_VOCAB = 128_000
# Llama 3's first special ids (the rest are <|reserved_special_token_N|>, up to id 128,255)
LLAMA3_SPECIALS = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
                   128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128008: "<|eom_id|>",
                   128009: "<|eot_id|>"}
TEXTS = [
    "Hello world",
    "",
    " ",
    "café 日本語 🌍 naïve — “quotes” ",
    "  \n\n\t spaces   everywhere \r\n",
    "I'm sure it's 12345678 o'clock, don't you think?",
    "<|begin_of_text|>special<|eot_id|> tokens <|start_header_id|>user<|end_header_id|>\n\nin text",
    "a<|eot_id|><|eot_id|>b <|end_of_text|>",
    "<|reserved_special_token_5|> and <|not_a_token|>",
    "\u00a0non-breaking\u200bzero-width\ufeff",
]


def train_byte_level(vocab_size: int = 400, specials: tuple[str, ...] = ()) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def write_model_files(directory: Path, tokenizer_config: dict, generation_config: dict | None = None) -> None:
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if generation_config is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation_config))


def llama3_tokenizer_json(directory: Path) -> Path:
    """A byte-level BPE laid out as Llama 3's: 128,000 base ids (a few hundred trained, the rest
    never produced), then 256 special tokens at Llama 3's ids; BOS added by its post-processor."""
    data = json.loads(train_byte_level().to_str())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), LLAMA3_BASE_VOCAB):
        vocab[f"<unused_{i}>"] = i
    names = {i: LLAMA3_SPECIALS.get(i, f"<|reserved_special_token_{i - 128000}|>")
             for i in range(LLAMA3_BASE_VOCAB, LLAMA3_BASE_VOCAB + 256)}
    data["added_tokens"] = [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, name in names.items()]
    data["post_processor"] = json.loads(processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 128000)]).__getstate__())
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    path.write_text(json.dumps(data, ensure_ascii=False))
    return path


def llama3_dir(directory: Path, chat_template: str | None = None) -> Path:
    """A Llama 3 instruct-style tokenizer directory: eos_token <|eot_id|>, generation stops at
    <|end_of_text|>, <|eom_id|> and <|eot_id|>."""
    llama3_tokenizer_json(directory)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True}
    if chat_template is not None:
        config["chat_template"] = chat_template
    write_model_files(directory, config, {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]})
    return directory


def llama2_dir(directory: Path, chat_template: str | None = None) -> Path:
    """A Llama 2 / Mistral / TinyLlama-style tokenizer.json: Metaspace BPE, <unk> <s> </s> at 0, 1, 2."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                             special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    write_model_files(directory, config)
    return directory


def reference(directory: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture(scope="module")
def llama3(tmp_path_factory) -> Path:
    return llama3_dir(tmp_path_factory.mktemp("llama3"))


@pytest.fixture(scope="module")
def llama2(tmp_path_factory) -> Path:
    return llama2_dir(tmp_path_factory.mktemp("llama2"))


# ----------------------------------------------------------------------------- exactness vs transformers


@pytest.mark.parametrize("which", ["llama3", "llama2"])
def test_encodes_and_decodes_exactly_as_transformers(which, request):
    directory = request.getfixturevalue(which)
    ours, theirs = open_tokenizer(directory), reference(directory)
    assert isinstance(ours, HFTokenizer)
    for text in TEXTS:
        with_bos = ours.encode(text, bos=True)
        assert with_bos.dtype == np.int32
        assert with_bos.tolist() == theirs(text)["input_ids"], text  # BOS from its post-processor
        ids = ours.encode(text, bos=False)
        assert ids.tolist() == theirs(text, add_special_tokens=False)["input_ids"], text
        for skip in (False, True):
            assert ours.decode(with_bos, skip_special_tokens=skip) == theirs.decode(
                with_bos.tolist(), skip_special_tokens=skip), text
    assert ours.vocab_size == len(theirs)
    assert ours.special_tokens == {t.content: i for i, t in theirs.added_tokens_decoder.items() if t.special}


def test_llama3_layout_ids_and_round_trip(llama3):
    tok = open_tokenizer(llama3)
    assert tok.vocab_size == 128_256
    assert (tok.bos_id, tok.eos_id) == (128000, 128009)
    assert tok.eos_ids == (128009, 128001, 128008)  # eos_token first, then generation_config's
    assert tok.token_id("<|eot_id|>") == 128009 and tok.token_text(128006) == "<|start_header_id|>"
    for text in TEXTS:  # byte level: every text comes back, special tokens included
        assert tok.decode(tok.encode(text, bos=False)) == text
    # a special token in the text is one id, not its characters
    assert tok.encode("<|eot_id|>", bos=False).tolist() == [128009]


def test_bos_eos_and_truncation_follow_lit_llama(llama3):
    tok = open_tokenizer(llama3)
    plain = tok.encode("Hello world", bos=False).tolist()
    both = tok.encode("Hello world", bos=True, eos=True).tolist()
    assert both == [128000] + plain + [128009]
    # the cut comes after EOS is appended: EOS is the first thing lost
    assert tok.encode("Hello world", bos=True, eos=True, max_length=len(both) - 1).tolist() == both[:-1]


def test_sentencepiece_converted_to_tokenizer_json_agrees_with_sentencepiece(tmp_path):
    """The demo's tokenizer.model as the Hub ships its tokenizer.json (converted by transformers):
    the same ids through either file, so a directory holding both may be read through tokenizer.json."""
    transformers = pytest.importorskip("transformers")
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(DEMO_TOKENIZER.read_bytes())
    write_model_files(src, {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                            "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": True})
    transformers.AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(tmp_path / "hf"))
    if not (tmp_path / "hf" / "tokenizer.json").is_file():
        pytest.skip("this transformers does not write tokenizer.json for a SentencePiece model")
    hf, sp = HFTokenizer(tmp_path / "hf" / "tokenizer.json"), SentencePieceTokenizer(DEMO_TOKENIZER)
    for text in ["Reverse the word rocket.", "The answer is: tekcor", "café and numbers 1234", "two  spaces"]:
        assert hf.encode(text, bos=True, eos=True).tolist() == sp.encode(text, bos=True, eos=True).tolist(), text
        assert hf.decode(sp.encode(text, bos=False)) == sp.decode(sp.encode(text, bos=False))
    assert (hf.bos_id, hf.eos_id) == (sp.bos_id, sp.eos_id)


# ----------------------------------------------------------------------------- choosing and the model's files


def test_open_tokenizer_picks_the_file_a_directory_holds(tmp_path, llama3):
    both = tmp_path / "both"
    both.mkdir()
    (both / "tokenizer.model").write_bytes(DEMO_TOKENIZER.read_bytes())
    assert isinstance(open_tokenizer(both), SentencePieceTokenizer)  # lit-llama's folders: as before
    (both / "tokenizer.json").write_text((llama3 / "tokenizer.json").read_text())
    (both / "tokenizer_config.json").write_text((llama3 / "tokenizer_config.json").read_text())
    assert isinstance(open_tokenizer(both), HFTokenizer)  # tokenizer.json first
    assert isinstance(open_tokenizer(both / "tokenizer.model"), SentencePieceTokenizer)  # a file: its kind
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no tokenizer.json or tokenizer.model"):
        open_tokenizer(tmp_path / "empty")


def test_sentencepiece_keeps_its_ids_and_takes_more_eos_from_generation_config(tmp_path):
    tok = SentencePieceTokenizer(DEMO_TOKENIZER)
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (1, 2, (2,))
    assert tok.special_tokens == {"<s>": 1, "</s>": 2} and tok.token_id("</s>") == 2
    assert tok.token_id("<|eot_id|>") is None
    (tmp_path / "tokenizer.model").write_bytes(DEMO_TOKENIZER.read_bytes())
    write_model_files(tmp_path, {}, {"eos_token_id": [2, 7]})
    assert open_tokenizer(tmp_path).eos_ids == (2, 7)


def test_eos_ids_from_generation_config_or_config_json(tmp_path, llama3):
    d = tmp_path / "d"
    d.mkdir()
    (d / "tokenizer.json").write_text((llama3 / "tokenizer.json").read_text())
    (d / "config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": 128001}))
    tok = open_tokenizer(d)  # no tokenizer_config.json, no generation_config.json: HF's config.json
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (128000, 128001, (128001,))
    write_model_files(d, {"eos_token": {"content": "<|eot_id|>", "special": True}}, {"eos_token_id": 128001})
    assert open_tokenizer(d).eos_ids == (128009, 128001)


def test_bad_files_are_named(tmp_path, llama3):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=str(bad / "tokenizer.json")):
        open_tokenizer(bad)
    d = tmp_path / "d"
    d.mkdir()
    (d / "tokenizer.json").write_text((llama3 / "tokenizer.json").read_text())
    with pytest.raises(TokenizerError, match="no EOS token"):
        open_tokenizer(d)
    write_model_files(d, {"eos_token": "<|nope|>"})
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: eos_token '<\|nope\|>' is not a token"):
        open_tokenizer(d)
    write_model_files(d, {"eos_token": "<|eot_id|>"}, {"eos_token_id": [999999]})
    with pytest.raises(TokenizerError, match=r"generation_config.json: token ids \[999999\] are outside"):
        open_tokenizer(d)
    (d / "generation_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match="generation_config.json: not readable JSON"):
        open_tokenizer(d)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        open_tokenizer(tmp_path / "missing.json")


def test_chat_template_from_the_model_files(tmp_path):
    write_model_files(tmp_path, {"chat_template": [{"name": "tool_use", "template": "T"},
                                                   {"name": "default", "template": "D"}]})
    files = ModelFiles.read(tmp_path)
    assert files.chat_template == "D" and files.chat_template_source == tmp_path / "tokenizer_config.json"
    (tmp_path / "chat_template.jinja").write_text("J")  # the newer file wins, as in transformers
    assert ModelFiles.read(tmp_path).chat_template == "J"
    assert ModelFiles.read(tmp_path / "nowhere").chat_template is None
