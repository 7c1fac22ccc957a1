"""Tests for jaxlora.text.tokenizer and jaxlora.train.data (lit-llama compatibility and batching)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm

from jaxlora.demo import DEMO_DIR
from jaxlora.errors import DataError
from jaxlora.text.prompts import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, generate_prompt
from jaxlora.text.tokenizer import Tokenizer
from jaxlora.train.data import (
    Batcher,
    bucket_lengths,
    count_truncated,
    eval_batches,
    load_prepared,
    load_records,
    prepare_records,
    prepare_sample,
    split_records,
)

TOKENIZER_PATH = DEMO_DIR / "tokenizer.model"

# The lit-llama templates, written out literally (scripts/prepare_alpaca.py).
LIT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nReverse the word.\n\n### Input:\nplanet\n\n### Response:"
)
LIT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nWhat is the capital of France?\n\n### Response:"
)

RECORDS = [
    {"instruction": "Reverse the word.", "input": "planet", "output": "tenalp"},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris"},
    {"instruction": "Translate to emoji.", "input": "hello wörld 🌍", "output": "👋 🌍"},
    {"instruction": "Write a long story.", "input": "", "output": "once upon a time " * 40},
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(TOKENIZER_PATH)


# --------------------------------------------------------------------------- templates


def test_templates_byte_for_byte() -> None:
    assert generate_prompt(RECORDS[0]) == LIT_WITH_INPUT
    assert generate_prompt(RECORDS[1]) == LIT_NO_INPUT
    assert generate_prompt({"instruction": "What is the capital of France?", "output": "x"}) == LIT_NO_INPUT
    assert PROMPT_WITH_INPUT.format(instruction="Reverse the word.", input="planet") == LIT_WITH_INPUT
    assert PROMPT_NO_INPUT.format(instruction="What is the capital of France?") == LIT_NO_INPUT


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_ids_and_encode(tokenizer: Tokenizer) -> None:
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, -1)
    assert tokenizer.vocab_size == 1024
    plain = tokenizer.encode("the reverse of planet", bos=False)
    assert plain.dtype == np.int32
    both = tokenizer.encode("the reverse of planet", bos=True, eos=True)
    assert both.tolist() == [1] + plain.tolist() + [2]
    # Truncation happens after BOS/EOS are added: EOS is the first thing lost.
    cut = tokenizer.encode("the reverse of planet", bos=True, eos=True, max_length=len(both) - 1)
    assert cut.tolist() == both.tolist()[:-1]
    text = "Héllo 🌍\n\tweird text"  # byte fallback: anything round-trips
    assert tokenizer.decode(tokenizer.encode(text, eos=True)) == text


def test_tokenizer_errors_name_the_file(tmp_path) -> None:
    bogus = tmp_path / "bogus.model"
    bogus.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="bogus.model"):
        Tokenizer(bogus)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")


def test_tokenizer_train(tmp_path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"the {w} is {w[::-1]}." for w in ["apple", "river", "stone"] * 20))
    path = Tokenizer.train(text, tmp_path / "tok", vocab_size=300, minloglevel=2)
    tok = Tokenizer(path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.processor.unk_id()) == (1, 2, -1, 0)
    assert tok.vocab_size == 300
    assert tok.decode(tok.encode("zebra? ✓")) == "zebra? ✓"


# --------------------------------------------------------------------------- prepare_sample


def reference_prepare(record: dict, sp: spm.SentencePieceProcessor, max_length: int, mask_inputs: bool) -> dict:
    """Independent re-implementation of lit-llama's prepare_alpaca.prepare_sample."""
    if record["input"]:
        prompt = (
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{record['instruction']}\n\n### Input:\n{record['input']}\n\n### Response:"
        )
    else:
        prompt = (
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{record['instruction']}\n\n### Response:"
        )
    full = ([sp.bos_id()] + sp.encode(prompt + record["output"]) + [sp.eos_id()])[:max_length]
    prompt_ids = ([sp.bos_id()] + sp.encode(prompt))[:max_length]
    labels = list(full)
    if mask_inputs:
        labels[: len(prompt_ids)] = [-1] * len(prompt_ids)
    return {"input_ids": full, "input_ids_no_response": prompt_ids, "labels": labels}


@pytest.mark.parametrize("mask_inputs", [False, True])
@pytest.mark.parametrize("max_length", [256, 60])
def test_prepare_sample_matches_reference(tokenizer: Tokenizer, mask_inputs: bool, max_length: int) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_PATH))
    for record in RECORDS:
        got = prepare_sample(record, tokenizer, max_length=max_length, mask_inputs=mask_inputs)
        want = reference_prepare(record, sp, max_length, mask_inputs)
        for key in ("input_ids", "input_ids_no_response", "labels"):
            assert got[key].dtype == np.int32
            assert got[key].tolist() == want[key], (record, key)
        assert {k: got[k] for k in record} == record  # original fields kept


def test_prepare_sample_masking(tokenizer: Tokenizer) -> None:
    record = RECORDS[0]
    plain = prepare_sample(record, tokenizer)
    masked = prepare_sample(record, tokenizer, mask_inputs=True)
    n_prompt = len(plain["input_ids_no_response"])
    assert np.array_equal(plain["labels"], plain["input_ids"])
    assert np.array_equal(masked["input_ids"], plain["input_ids"])
    assert (masked["labels"][:n_prompt] == -1).all()
    assert np.array_equal(masked["labels"][n_prompt:], plain["input_ids"][n_prompt:])
    assert masked["labels"][-1] == tokenizer.eos_id


def test_prepare_sample_truncation_quirk_loses_eos(tokenizer: Tokenizer) -> None:
    long_record = RECORDS[3]
    sample = prepare_sample(long_record, tokenizer, max_length=64)
    assert len(sample["input_ids"]) == 64
    assert tokenizer.eos_id not in sample["input_ids"].tolist()
    short = prepare_sample(RECORDS[1], tokenizer, max_length=256)
    assert short["input_ids"][-1] == tokenizer.eos_id


def test_count_truncated_counts_samples_cut_to_max_length(tokenizer: Tokenizer) -> None:
    lengths = [len(prepare_sample(r, tokenizer, max_length=10_000)["input_ids"]) for r in RECORDS]
    limit = sorted(lengths)[len(lengths) // 2]  # some records fit, some do not
    samples = prepare_records(RECORDS, tokenizer, max_length=limit)
    want = sum(n > limit for n in lengths)
    assert 0 < want < len(RECORDS) and count_truncated(samples, limit) == want
    assert all(len(s["input_ids"]) <= limit for s in samples)  # cut, yet still counted
    # lit-llama's prepared files (no num_tokens): what the batcher will cut.
    lit = [{k: v for k, v in s.items() if k != "num_tokens"} for s in prepare_records(RECORDS, tokenizer, 10_000)]
    assert count_truncated(lit, limit) == want


# --------------------------------------------------------------------------- load_records


def test_load_records_json_and_jsonl(tmp_path) -> None:
    as_json = tmp_path / "data.json"
    as_json.write_text(json.dumps([{"instruction": "a", "output": "b"}, RECORDS[0]]))
    records = load_records(as_json)
    assert records == [{"instruction": "a", "output": "b", "input": ""}, RECORDS[0]]
    as_jsonl = tmp_path / "data.jsonl"
    as_jsonl.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    assert load_records(as_jsonl) == RECORDS
    jsonl_named_json = tmp_path / "lines.json"
    jsonl_named_json.write_text(as_jsonl.read_text())
    assert load_records(jsonl_named_json) == RECORDS


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_records_errors(tmp_path) -> None:
    bad = _write(tmp_path, "bad.json", '[\n{"instruction": "a", "output": "b"},\n{"instruction": }\n]')
    with pytest.raises(DataError, match=r"bad\.json.*line 3, column 17"):
        load_records(bad)
    missing = _write(tmp_path, "missing.json", json.dumps([RECORDS[0], {"instruction": "x", "input": ""}]))
    with pytest.raises(DataError, match=r"missing\.json: record 1 has no 'output' field"):
        load_records(missing)
    wrong_type = _write(tmp_path, "wrong.json", json.dumps([{"instruction": "x", "output": 5}]))
    with pytest.raises(DataError, match=r"wrong\.json: record 0 field 'output' must be a string, got int"):
        load_records(wrong_type)
    not_object = _write(tmp_path, "notobj.json", json.dumps([RECORDS[0], ["x"]]))
    with pytest.raises(DataError, match=r"notobj\.json: record 1 is a list"):
        load_records(not_object)
    with pytest.raises(DataError, match=r"empty\.json: the data set is empty"):
        load_records(_write(tmp_path, "empty.json", "[]"))
    with pytest.raises(DataError, match=r"dict\.json: expected a JSON list"):
        load_records(_write(tmp_path, "dict.json", '{"data": []}'))
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "nope.json")


def test_load_records_names_where_truncated_json_ends_and_points_pt_files_to_their_directory(tmp_path) -> None:
    cut = _write(tmp_path, "cut.json", json.dumps(RECORDS)[:150])
    with pytest.raises(DataError) as err:
        load_records(cut)
    message = str(err.value)
    assert "cut.json: malformed JSON at line 1, column " in message and "(character " in message
    assert json.dumps(RECORDS)[140:150] in message and "is the file truncated?" in message
    for name, data in (("train.pt", b"\x80\x02anything"), ("prepared.bin", b"PK\x03\x04zip")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=rf"{name}: a PyTorch file, not JSON records\. lit-llama's prepared "
                                            rf"data .* is given as the directory that holds them: --data_path "):
            load_records(tmp_path / name)


def test_load_records_jsonl_line_numbers(tmp_path) -> None:
    lines = [json.dumps(RECORDS[0]), "", json.dumps(RECORDS[1]), '{"instruction": "x", "output": "y"']
    with pytest.raises(DataError, match=r"bad\.jsonl: malformed JSON at line 4"):
        load_records(_write(tmp_path, "bad.jsonl", "\n".join(lines)))
    lines[3] = json.dumps({"output": "y"})
    with pytest.raises(DataError, match=r"nofield\.jsonl: record 2 \(line 4\) has no 'instruction' field"):
        load_records(_write(tmp_path, "nofield.jsonl", "\n".join(lines)))
    with pytest.raises(DataError, match="empty"):
        load_records(_write(tmp_path, "blank.jsonl", "\n\n"))


def test_split_records_deterministic() -> None:
    records = [{"instruction": str(i), "output": ""} for i in range(50)]
    train, val = split_records(records, 10, seed=42)
    assert len(train) == 40 and len(val) == 10
    assert sorted(r["instruction"] for r in train + val) == sorted(r["instruction"] for r in records)
    assert split_records(records, 10, seed=42) == (train, val)
    assert split_records(records, 10, seed=1)[1] != val
    assert len(split_records(records, 0.2, seed=0)[1]) == 10


# --------------------------------------------------------------------------- load_prepared


def test_load_prepared_lit_llama_structure(tmp_path, tokenizer: Tokenizer) -> None:
    torch = pytest.importorskip("torch")
    ours = [prepare_sample(r, tokenizer, mask_inputs=True) for r in RECORDS]
    lit = [
        {**r, **{k: torch.tensor(s[k].tolist(), dtype=torch.int) for k in ("input_ids", "input_ids_no_response", "labels")}}
        for r, s in zip(RECORDS, ours)
    ]
    path = tmp_path / "train.pt"
    torch.save(lit, path)
    loaded = load_prepared(path)
    assert len(loaded) == len(RECORDS)
    for got, want in zip(loaded, ours):
        for key in ("input_ids", "input_ids_no_response", "labels"):
            assert got[key].dtype == np.int32 and np.array_equal(got[key], want[key])
        assert got["instruction"] == want["instruction"] and got["output"] == want["output"]
    torch.save({"not": "a list"}, tmp_path / "dict.pt")
    with pytest.raises(DataError, match=r"dict\.pt"):
        load_prepared(tmp_path / "dict.pt")


# --------------------------------------------------------------------------- batching


def make_samples(lengths: list[int]) -> list[dict]:
    """Sample i is filled with i + 1 (so rows identify samples); labels are ids + 1000."""
    return [
        {"input_ids": np.full(n, i + 1, np.int32), "labels": np.full(n, i + 1001, np.int32)}
        for i, n in enumerate(lengths)
    ]


LENGTHS = [5, 70, 12, 130, 40, 64, 65, 3, 200, 90]


def check_batch(batch: dict, samples: list[dict], n_micro: int, mbs: int, buckets: tuple[int, ...], max_len: int) -> None:
    ids, labels, index = batch["input_ids"], batch["labels"], batch["index"]
    assert ids.dtype == labels.dtype == np.int32
    assert ids.shape[:2] == (n_micro, mbs) and labels.shape == ids.shape and index.shape == (n_micro, mbs)
    lengths = [min(len(samples[i]["input_ids"]), max_len) for i in index.reshape(-1) if i >= 0]
    assert ids.shape[2] == min(b for b in buckets if b >= max(lengths))
    for row_ids, row_labels, i in zip(ids.reshape(-1, ids.shape[2]), labels.reshape(-1, ids.shape[2]), index.reshape(-1)):
        n = min(len(samples[i]["input_ids"]), max_len) if i >= 0 else 0
        if i >= 0:
            assert (row_ids[:n] == i + 1).all() and (row_labels[:n] == i + 1001).all()
        assert (row_ids[n:] == 0).all() and (row_labels[n:] == -1).all()


def test_bucket_lengths() -> None:
    assert bucket_lengths(256) == (64, 128, 256)
    assert bucket_lengths(300) == (64, 128, 256, 300)
    assert bucket_lengths(64) == (64,)
    assert bucket_lengths(40) == (40,)
    assert Batcher(make_samples([3]), 1, 1, 100, buckets=[16, 32]).buckets == (16, 32, 100)
    with pytest.raises(ValueError):
        Batcher(make_samples([3]), 1, 1, 100, buckets=[128])


def test_batcher_shapes_padding_and_epochs() -> None:
    samples = make_samples(LENGTHS)
    batcher = Batcher(samples, batch_size=4, micro_batch_size=2, max_seq_length=256, seed=3)
    seen = []
    for _ in range(5):  # 20 samples = exactly two epochs of 10
        batch = next(batcher)
        check_batch(batch, samples, 2, 2, (64, 128, 256), 256)
        seen += batch["index"].reshape(-1).tolist()
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # reshuffled each epoch
    assert batcher.state()["epoch"] == 2 and batcher.state()["position"] == 0
    assert seen[:10] == batcher.epoch_order(0).tolist()


def test_batcher_truncates_to_max_seq_length() -> None:
    samples = make_samples(LENGTHS)
    batcher = Batcher(samples, batch_size=10, micro_batch_size=5, max_seq_length=100, seed=0)
    batch = next(batcher)
    assert batch["input_ids"].shape == (2, 5, 100)
    check_batch(batch, samples, 2, 5, (64, 100), 100)


def test_batcher_determinism_and_resume() -> None:
    samples = make_samples(LENGTHS)

    def run(batcher: Batcher, n: int) -> list[dict]:
        return [next(batcher) for _ in range(n)]

    a = run(Batcher(samples, 4, 4, 256, seed=7), 8)
    b = run(Batcher(samples, 4, 4, 256, seed=7), 8)
    c = run(Batcher(samples, 4, 4, 256, seed=8), 8)
    assert all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert any(not np.array_equal(x["index"], y["index"]) for x, y in zip(a, c))

    first = Batcher(samples, 4, 4, 256, seed=7)
    run(first, 3)  # ends mid-epoch: 12 samples = epoch 1, position 2
    state = json.loads(json.dumps(first.state()))
    assert (state["epoch"], state["position"]) == (1, 2)
    resumed = Batcher(samples, 4, 4, 256, seed=7, state=state)
    restored = Batcher(samples, 4, 4, 256, seed=7)
    restored.restore(state)
    for want, got1, got2 in zip(a[3:], run(resumed, 5), run(restored, 5)):
        for key in ("input_ids", "labels", "index"):
            assert np.array_equal(want[key], got1[key]) and np.array_equal(want[key], got2[key])
    with pytest.raises(ValueError, match="seed"):
        Batcher(samples, 4, 4, 256, seed=9, state=state)


def test_batcher_validation() -> None:
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        Batcher(make_samples(LENGTHS), batch_size=6, micro_batch_size=4, max_seq_length=256)
    with pytest.raises(ValueError):
        Batcher([], batch_size=4, micro_batch_size=4, max_seq_length=256)


def test_eval_batches() -> None:
    samples = make_samples(LENGTHS)
    batches = list(eval_batches(samples, micro_batch_size=4, max_seq_length=256))
    assert len(batches) == 3
    for batch in batches:
        check_batch(batch, samples, 1, 4, (64, 128, 256), 256)
    index = np.concatenate([b["index"].reshape(-1) for b in batches])
    assert index.tolist() == list(range(10)) + [-1, -1]
    assert (batches[-1]["labels"][0, 2:] == -1).all() and (batches[-1]["input_ids"][0, 2:] == 0).all()
    again = list(eval_batches(samples, 4, 256))
    assert all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, again))
    fixed = list(eval_batches(samples, 4, 256, buckets=[256]))
    assert {b["input_ids"].shape for b in fixed} == {(1, 4, 256)}


# --------------------------------------------------------------------------- demo assets


def test_demo_assets(tokenizer: Tokenizer) -> None:
    records = load_records(DEMO_DIR / "instructions.json")
    assert 2000 <= len(records) <= 4000
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)
    lengths = [len(prepare_sample(r, tokenizer)["input_ids"]) for r in records[:200]]
    assert max(lengths) <= 128
    corpus = (DEMO_DIR / "corpus.txt").read_text(encoding="utf-8")
    assert "### Instruction" not in corpus and "The capital of France is Paris." in corpus
    total = sum((DEMO_DIR / n).stat().st_size for n in ("instructions.json", "corpus.txt", "tokenizer.model"))
    assert total < 2_000_000


def test_a_process_fills_and_tokenizes_only_its_rows(tokenizer: Tokenizer) -> None:
    """Batcher(local=...) over lazily tokenized samples: the rows this process holds equal the
    one-process batch's, the others are padding, nothing else is tokenized, and the pad length
    and token count are the whole batch's (as agreed with the other processes)."""
    from jaxlora.train.data import LazySamples, LocalRows, prepare_sample
    records = [{"instruction": f"Say {'word ' * (i % 7)}{i}.", "input": "", "output": "ok" * (i % 3 + 1)}
               for i in range(40)]
    eager = [prepare_sample(r, tokenizer, 64) for r in records]
    whole = next(Batcher(eager, 16, 4, 64, seed=3))
    fill = np.zeros(16, bool)
    fill[[0, 1, 4, 5, 8, 9, 12, 13]] = True  # the first half of each micro-batch
    lazy = LazySamples(records, lambda r: prepare_sample(r, tokenizer, 64))
    told = []

    def agree(longest: int, tokens: int) -> tuple[int, int]:
        told.append((longest, tokens))
        return whole["input_ids"].shape[-1], int(whole["tokens"])  # what the other process would make it
    mine = next(Batcher(lazy, 16, 4, 64, seed=3, local=LocalRows(fill, fill, agree)))
    assert lazy.tokenized == 8
    rows = fill.reshape(4, 4)
    np.testing.assert_array_equal(mine["input_ids"][rows], whole["input_ids"][rows])
    np.testing.assert_array_equal(mine["labels"][rows], whole["labels"][rows])
    assert (mine["labels"][~rows] == -1).all() and (mine["input_ids"][~rows] == 0).all()
    assert mine["input_ids"].shape == whole["input_ids"].shape and int(mine["tokens"]) == int(whole["tokens"])
    own = [eager[i] for i in whole["index"].reshape(-1)[fill]]
    assert told == [(max(len(s["input_ids"]) for s in own), sum(len(s["input_ids"]) for s in own))]
