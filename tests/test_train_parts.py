"""The training loop's parts, one at a time: the generated CLI, metrics and the step tracker,
evaluation helpers, checkpoints (refusal, --overwrite, --resume with nothing to resume),
exports, the report, the typed run spec; then Ctrl-C on the command line and the house rules
of jaxlora/train (function length, imports)."""
from __future__ import annotations

import ast
import dataclasses
import json
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest
from test_train import ROOT, _env, small_assets, tiny_args

from jaxlora.config import LLaMAConfig, LoRAConfig
from jaxlora.errors import CheckpointError, MeshError, NonFiniteLossError, TrainingError
from jaxlora.parallel.sharding import default_mesh_shape, make_mesh
from jaxlora.train import cli, loop, settings
from jaxlora.train.build import fit_micro_batch
from jaxlora.train.checkpoints import check_resumable, open_checkpoints
from jaxlora.train.evaluate import Evaluation, diverse
from jaxlora.train.exports import RUN_OUTPUTS, clear_outputs
from jaxlora.train.metrics import MetricsLog, QueuedStep, StepClock, StepTracker
from jaxlora.train.plot import read_metrics
from jaxlora.train.report import TrainResult, report
from jaxlora.train.settings import TrainArgs, resolve_args
from jaxlora.train.spec import RunSpec, run_spec

TRAIN_PKG = ROOT / "jaxlora" / "train"


def _help() -> str:
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# ----------------------------------------------------------------------------- the generated CLI

def test_every_help_field_is_a_flag_with_its_choices_and_type():
    parser = cli.build_parser("d", "e")
    actions = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(TrainArgs):
        if not f.metadata.get("help"):
            assert f.name not in actions, f.name
            continue
        action = actions[f.name]
        if f.metadata.get("choices") is not None:
            assert list(action.choices) == list(f.metadata["choices"]), f.name
    assert actions["val_size"].type is float and actions["lora_r"].type is int and actions["seed"].type is int
    # both profiles' defaults, in each flag's help
    assert actions["learning_rate"].help.endswith("[0.003 | 0.0003]")
    assert actions["batch_size"].help.endswith("[16 | 128]") and actions["seed"].help.endswith("(default 1337)")
    # parsing: left out -> TrainArgs' default; negated flags; booleans both ways
    a = cli.train_args(vars(parser.parse_args(["--no_plot", "--no-scan_layers", "--lora_r", "4", "--overwrite"])))
    assert (a.plot, a.progress, a.scan_layers, a.lora_r, a.overwrite, a.seed) == (False, True, False, 4, True, 1337)
    with pytest.raises(SystemExit):
        parser.parse_args(["--max_steps", "3", "--epochs", "1"])  # mutually exclusive


def test_mesh_help_states_the_default_the_code_chooses():
    text = " ".join(_help().split())
    start = text.index("--mesh MESH device mesh")
    mesh_help = text[start:text.index("--coordinator_address", start)]
    assert "tensor parallel" in mesh_help and "else fsdp" not in mesh_help, mesh_help
    assert settings.DEFAULT_MESH in mesh_help
    # ... and the code does choose tensor parallelism for weights too big for one device
    gpus = [type("D", (), {"process_index": 0, "memory_stats": lambda self: {"bytes_limit": 80 << 30}})()
            for _ in range(4)]
    assert default_mesh_shape(LLaMAConfig.from_name("65B"), gpus)["tensor"] == 4


def test_help_examples_with_line_continuations_render():
    text = _help()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "python train.py --preset 7b \\" in line)
    example = lines[start:start + 4]
    assert all(line.rstrip().endswith("\\") for line in example[:3]), example
    assert [line.split()[0] for line in example[1:]] == ["--pretrained_path", "--tokenizer_path", "--data_path"]
    for line in lines:  # no flag text joined to a run of spaces by a backslash-newline in a string
        assert "\\    " not in line and "\\ --" not in line, line


def test_choices_are_checked_from_the_same_tables():
    with pytest.raises(ValueError, match=r"precision must be one of \['bf16-true', 'bf16-mixed', '32-true'\]"):
        resolve_args(TrainArgs(precision="fp8"))
    with pytest.raises(ValueError, match="--resume.*--overwrite"):
        resolve_args(TrainArgs(resume=True, overwrite=True))


# ----------------------------------------------------------------------------- metrics

def test_metrics_log_keeps_rows_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"type": "eval", "step": 0}, {"type": "train", "step": 1}, {"type": "train", "step": 2},
        {"type": "error", "step": 2}, {"type": "train", "step": 3}]) + '{"half')
    rows = MetricsLog(path, keep_until=2)
    rows.write(type="train", step=3)
    rows.close()
    assert [(r["type"], r["step"]) for r in read_metrics(path)] == [("eval", 0), ("train", 1), ("train", 2),
                                                                     ("train", 3)]
    MetricsLog(tmp_path / "other.jsonl", enabled=False).write(type="train", step=1)
    assert not (tmp_path / "other.jsonl").exists()


def test_step_clock_sums_steps():
    clock = StepClock()
    dt = clock.step_done(10, 16, 1e3)
    clock.step_done(5, 16, 1e3)
    assert dt >= 0 and clock.steps == 2 and clock.real_tokens == 15 and clock.padded_tokens == 32


def _queued(step: int, loss: float = 1.0) -> QueuedStep:
    m = {"loss": jnp.float32(loss), "grad_norm": jnp.float32(0.5), "tokens": jnp.int32(7)}
    return QueuedStep(step, m, tokens=7, padded_tokens=8, flops=1.0, epoch=0)


class _Interrupting(dict):
    """Metrics whose first read is cut by Ctrl-C (as when the host waits for the device)."""

    cut = True

    def __getitem__(self, key):
        if _Interrupting.cut:
            _Interrupting.cut = False
            raise KeyboardInterrupt
        return super().__getitem__(key)


def test_tracker_records_a_step_only_when_its_row_is_written(tmp_path):
    rows = MetricsLog(tmp_path / "m.jsonl")
    tracker = StepTracker(rows, lambda step: 1e-3, lambda msg: None, lambda: "none yet")
    tracker.queue(_queued(1))
    tracker.queue(_queued(2))
    tracker.flush(keep_last=True)  # step 1 written, step 2 still queued
    assert [q.step for q in tracker.queued] == [2]
    cut = _queued(3)
    cut.metrics = _Interrupting(cut.metrics)
    tracker.queue(cut)
    tracker.flush(keep_last=True)  # step 2
    with pytest.raises(KeyboardInterrupt):
        tracker.flush()  # reading step 3 is interrupted ...
    assert [q.step for q in tracker.queued] == [3]  # ... and step 3 stays queued
    tracker.flush()
    rows.close()
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [1, 2, 3]


def test_tracker_stops_at_a_non_finite_loss(tmp_path):
    rows = MetricsLog(tmp_path / "m.jsonl")
    tracker = StepTracker(rows, lambda step: 1e-3, lambda msg: None, lambda: "step 2 in /x/2")
    tracker.queue(_queued(3, loss=float("nan")))
    tracker.queue(_queued(4))
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*Last good checkpoint: step 2 in /x/2"):
        tracker.flush()
    rows.close()
    assert read_metrics(tmp_path / "m.jsonl") == [{"type": "error", "step": 3, "loss": pytest.approx(float("nan"),
                                                                                                     nan_ok=True),
                                                   "grad_norm": 0.5}]


# ----------------------------------------------------------------------------- evaluation

def test_diverse_prefers_different_instructions():
    samples = [{"instruction": i} for i in ("Reverse a", "Reverse b", "Write c", "Name d", "Write e")]
    assert [s["instruction"] for s in diverse(samples, 3)] == ["Reverse a", "Write c", "Name d"]
    assert [s["instruction"] for s in diverse(samples[:2], 2)] == ["Reverse a", "Reverse b"]
    assert diverse(samples, 0) == []  # --num_samples 0: nothing shown, nothing generated


def test_evaluation_rows():
    assert Evaluation(1.5, sample="x").row(3) == {"type": "eval", "step": 3, "val_loss": 1.5, "sample": "x"}
    full = Evaluation(1.5, 0.25, [], "x", full=True).row(0)
    assert full == {"type": "eval", "step": 0, "val_loss": 1.5, "exact_match": 0.25, "sample": "x"}


# ----------------------------------------------------------------------------- checkpoints

def test_check_resumable_names_the_key_and_the_model(tmp_path):
    a = resolve_args(tiny_args(tmp_path))
    config = LLaMAConfig.from_name("tiny")
    meta = {"args": {**settings.json_args(a), "lora_r": 16}, "model": config.to_dict()}
    with pytest.raises(CheckpointError, match=r"/ck: saved with lora_r=16, this run has lora_r=4"):
        check_resumable(meta, a, config, tmp_path / "ck")
    meta = {"args": settings.json_args(a), "model": LLaMAConfig.from_name("tiny", n_layer=3).to_dict()}
    with pytest.raises(CheckpointError, match="saved for model"):
        check_resumable(meta, a, config, tmp_path / "ck")


def test_resume_into_an_empty_directory_says_so_once(tmp_path):
    said = []
    open_checkpoints(tmp_path, resolve_args(tiny_args(tmp_path, resume=True)), said.append).close()
    assert len(said) == 1 and said[0].startswith("warning: --resume: no checkpoint in") and "new run" in said[0]


def test_rerun_is_refused_naming_overwrite_and_overwrite_starts_fresh(tmp_path, capsys):
    out = tmp_path / "out"
    first = loop.run(tiny_args(out, max_steps=2, save_interval=1))
    (out / "notes.txt").write_text("mine")  # not the run's: stays
    with pytest.raises(TrainingError, match=r"--resume to continue that run, --overwrite to start a new one"):
        loop.run(tiny_args(out, max_steps=1))
    again = loop.run(tiny_args(out, max_steps=1, overwrite=True, verbose=True))
    assert "--overwrite: removed" in capsys.readouterr().out
    assert again.step == 1 and again.val_loss_before == first.val_loss_before
    from jaxlora.train.checkpoints import Checkpointer
    assert Checkpointer(out / "checkpoints").all_steps() == [1]  # steps 1 and 2 of the old run are gone
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["type"] == "train"] == [1]
    assert (out / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- exports

def test_clear_outputs_removes_only_the_runs_outputs(tmp_path):
    for name in RUN_OUTPUTS:
        (tmp_path / name).mkdir() if "." not in name else (tmp_path / name).write_text("x")
    (tmp_path / "data.json").write_text("[]")
    assert sorted(clear_outputs(tmp_path)) == sorted(RUN_OUTPUTS)
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]


# ----------------------------------------------------------------------------- report

def test_report_counts_this_runs_steps():
    resumed = TrainResult(out_dir="o", step=500, start_step=103, steps_run=397, total_seconds=43.0,
                          val_loss_before=2.0, val_loss_after=0.7, exact_match_before=None, exact_match_after=None)
    head = report(resumed).splitlines()[1]
    assert head == "=== LoRA fine-tuning: 397 steps (steps 104..500, resumed from step 103), 43s ===", head
    fresh = dataclasses.replace(resumed, start_step=0, steps_run=500)
    assert report(fresh).splitlines()[1] == "=== LoRA fine-tuning: 500 steps, 43s ==="


def test_report_shortens_long_samples_but_keeps_short_ones_whole():
    long_prompt = "a" * 150 + "MIDDLE" + "z" * 150
    r = TrainResult(out_dir="o", step=1, start_step=0, steps_run=1, total_seconds=1.0, val_loss_before=2.0,
                    val_loss_after=1.0, exact_match_before=None, exact_match_after=None,
                    samples_after=[{"instruction": long_prompt, "response": "ok", "expected": "ok"}])
    line = next(x for x in report(r).splitlines() if x.startswith("  'a"))
    assert "MIDDLE" not in line and "[106 characters]" in line and line.endswith("-> 'ok'   (expected 'ok')"), line
    assert line.count("a") >= 100 and line.count("z") >= 100  # both ends shown


# ----------------------------------------------------------------------------- the run spec and the builder

def test_run_spec_is_what_build_run_reads():
    a = resolve_args(TrainArgs(preset="7b"))
    spec = run_spec(a)
    assert isinstance(spec, RunSpec) and dataclasses.is_dataclass(spec)
    assert spec.lora == LoRAConfig(r=8, alpha=16.0, dropout=0.05, targets=("q", "v"))
    assert (spec.optimizer.learning_rate, spec.batch.batch_size, spec.batch.micro_batch_size,
            spec.speed.precision, spec.speed.remat, spec.base.path) == (
        3e-4, 128, 4, "bf16-true", "dots_no_batch", "checkpoints/lit-llama/7B/lit-llama.pth")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 1
    import inspect

    from jaxlora.train.build import build_run
    assert list(inspect.signature(build_run).parameters)[0] == "spec"
    bench = (ROOT / "bench" / "train_throughput.py").read_text()
    assert "build_run(run_spec(a)" in bench  # the benchmark builds train.py's run


def test_micro_batch_message_says_what_happens():
    said = []
    assert fit_micro_batch(16, 16, 4, said.append) == 4
    assert said == ["micro_batch_size: 16 rows per shard x 4 shards = 64 > batch_size 16; using 4"]


def test_mesh_larger_than_the_devices_says_how_many_it_needs():
    import jax
    with pytest.raises(MeshError, match=r"the mesh needs 2 devices, there is 1$"):
        make_mesh(data=2, devices=jax.devices()[:1])


# ----------------------------------------------------------------------------- Ctrl-C on the command line

def test_ctrl_c_inside_a_deferred_block_is_raised_when_it_ends():
    import os

    from jaxlora.train.metrics import interrupts_deferred
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here: no exception inside the block
            done.append("row written and dequeued")
    assert done == ["row written and dequeued"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back


def test_ctrl_c_records_every_step_says_interrupted_once_and_resume_counts_its_own_steps(tmp_path, capsys):
    assets = small_assets()
    out = tmp_path / "out"
    args = tiny_args(out)
    flags = ["--preset", "tiny", "--pretrained_path", "none", "--tokenizer_path", assets["tokenizer"],
             "--data_path", assets["data"], "--out_dir", str(out), "--lora_r", "4", "--lora_alpha", "8",
             "--lora_dropout", "0.1", "--learning_rate", "1e-2", "--warmup_steps", "2",
             "--batch_size", "4", "--micro_batch_size", "2", "--max_seq_length", "96", "--val_size", "8",
             "--eval_iters", "2", "--precision", "32-true", "--exact_match_samples", "0", "--sample_instruction=",
             "--scan_unroll", "1", "--max_steps", "100000", "--eval_interval", "100000", "--save_interval", "100000",
             "--no_progress", "--no_plot"]
    proc = subprocess.Popen([sys.executable, "train.py", *flags], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:  # wait until steps are running
        lines.append(line)
        if line.startswith("compiled the train step"):
            break
    deadline = time.monotonic() + 60  # until 2 steps are recorded (rows come one step behind the device)
    while time.monotonic() < deadline and not (
            (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count('"type": "train"') >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    said = "".join(lines) + rest + err
    assert proc.returncode == 130, said[-3000:]
    assert said.lower().count("interrupted") == 1, said[-3000:]
    from jaxlora.train.checkpoints import Checkpointer
    latest = Checkpointer(out / "checkpoints").latest_step()
    assert latest and latest > 1, said[-3000:]
    trained = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["type"] == "train"]
    assert trained == list(range(1, latest + 1))  # every trained step, the checkpointed one last
    assert f"saved step {latest}" in said
    resumed = loop.run(dataclasses.replace(args, max_steps=latest + 2, resume=True, verbose=True, num_samples=0,
                                           eval_interval=100000, save_interval=100000))
    printed = capsys.readouterr().out
    assert resumed.steps_run == 2 and resumed.start_step == latest
    assert f"=== LoRA fine-tuning: 2 steps (steps {latest + 1}..{latest + 2}, resumed from step {latest})" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_run"] == 2 and summary["step"] == latest + 2


# ----------------------------------------------------------------------------- the loop's shape
# (imports, private names and function length for every package: tests/test_house.py)


def _functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


@pytest.mark.parametrize("path", sorted(TRAIN_PKG.glob("*.py")), ids=lambda p: p.name)
def test_no_state_shared_through_nonlocal(path):
    for fn in _functions(ast.parse(path.read_text())):
        assert not any(isinstance(node, ast.Nonlocal) for node in ast.walk(fn)), f"{path.name}:{fn.name}: nonlocal"


def test_the_loop_is_short():
    tree = ast.parse((TRAIN_PKG / "loop.py").read_text())
    run = next(f for f in _functions(tree) if f.name == "run")
    assert run.end_lineno - run.lineno + 1 < 50
