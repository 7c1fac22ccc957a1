"""One generation session, as `generate.py` runs it: settle the settings (the demo's defaults
with no model flags), check the sources and find the tokenizer before reading any weights,
load and prepare the model, then draw the samples, streaming each to `out` and the rest
(the instruction, the model, timings) to `err`."""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp

from jaxlora.demo import DEMO_BASE, DEMO_INSTRUCTION
from jaxlora.infer import demo
from jaxlora.infer.decode import Sampling, generate, prepare
from jaxlora.infer.load import (
    Sources,
    check_sources,
    find_tokenizer,
    load_for_generation,
)
from jaxlora.infer.report import CompileClock, SampleClock, TextStream
from jaxlora.model.llama import LLaMA
from jaxlora.text.prompts import PromptStyle, Rendered, encode_prompt, get_style
from jaxlora.text.tokenizer import TextTokenizer, open_tokenizer, read_json
from jaxlora.weights import jaxlora_dir as cio
from jaxlora.weights.load import adapters_base, adapters_format
from jaxlora.weights.quantized import check_mode

LIT_PROMPT = "What food do lamas eat?"  # lit-llama's generate/lora.py default
LIT_TEMPERATURE = 0.8  # lit-llama's default; the demo decodes greedily (the tiny model's samples vary)
NO_TOP_K = ("0", "none")
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclass
class GenerateOptions:
    """generate.py's flags (the parser takes its defaults from here). None: decided by the
    session (the demo's value with no model flags, else lit-llama's)."""

    prompt: str | None = None
    input: str = ""
    prompt_style: str = "auto"  # a name in text.prompts.PROMPT_STYLES, or auto (see choose_style)
    system: str = ""  # the system prompt, for the chat styles
    checkpoint_dir: str | None = None
    pretrained_path: str | None = None
    adapters: str | None = None
    lora_path: str | None = None
    lora_alpha: float = 16.0
    tokenizer_path: str | None = None
    quantize: str | None = None
    unmerged: bool = False
    dtype: str = "auto"
    scan_layers: bool | None = None
    num_samples: int = 1
    max_new_tokens: int = 100
    top_k: str | int | None = 200
    top_p: float = 1.0
    temperature: float | None = None
    seed: int = 1234

    @property
    def is_demo(self) -> bool:
        return not any([self.checkpoint_dir, self.pretrained_path, self.adapters, self.lora_path])


def parse_top_k(value: str | int | None) -> int | None:
    """--top_k: a positive count, or 0 / none (any case) for no limit (None)."""
    if value is None or str(value).strip().lower() in NO_TOP_K:
        return None
    try:
        k = int(value)
    except ValueError:
        k = 0
    if k < 1:
        raise ValueError(f"--top_k {value}: give a positive number of tokens, or 0 or none for no limit")
    return k


def with_defaults(opts: GenerateOptions) -> tuple[GenerateOptions, list[str]]:
    """The options with every None settled, and notes saying which defaults were chosen and why."""
    notes = []
    if opts.is_demo:
        has_adapters = cio.is_adapters_dir(demo.DEMO_ADAPTERS)
        prompt = DEMO_INSTRUCTION if opts.prompt is None else opts.prompt
        opts = dataclasses.replace(opts, pretrained_path=str(DEMO_BASE), prompt=prompt,
                                   adapters=str(demo.DEMO_ADAPTERS) if has_adapters else None)
        notes.append(demo.demo_note(prompt, opts.input, has_adapters))
        if opts.temperature is None:
            opts = dataclasses.replace(opts, temperature=0.0)
            notes.append(f"demo: greedy decoding (--temperature {LIT_TEMPERATURE} samples, as lit-llama does)")
    return dataclasses.replace(opts, prompt=LIT_PROMPT if opts.prompt is None else opts.prompt,
                               temperature=LIT_TEMPERATURE if opts.temperature is None else opts.temperature), notes


def check_options(opts: GenerateOptions) -> tuple[Sampling, Sources, TextTokenizer]:
    """Everything checkable before the weights are read, in the order a user should hear of
    it: the settings, the weights' paths, then the tokenizer (found from the weights)."""
    sampling = Sampling(temperature=opts.temperature, top_k=parse_top_k(opts.top_k), top_p=opts.top_p)
    if opts.max_new_tokens < 1 or opts.num_samples < 1:
        raise ValueError(f"--max_new_tokens and --num_samples must be >= 1, got {opts.max_new_tokens} and "
                         f"{opts.num_samples}")
    if not opts.prompt.strip():
        raise ValueError("--prompt is empty: give an instruction (or a text to continue with --prompt_style plain)")
    sources = check_sources(opts.checkpoint_dir, opts.pretrained_path, opts.adapters, opts.lora_path)
    stored_quantization(opts)  # a quantized checkpoint asked for another mode: refused before loading
    tokenizer = open_tokenizer(opts.tokenizer_path or find_tokenizer(sources))
    if opts.prompt_style != "auto":
        get_style(opts.prompt_style, tokenizer)  # a style the tokenizer cannot write is refused now
    return sampling, sources, tokenizer


def load_model(opts: GenerateOptions, tokenizer: TextTokenizer, err: TextIO) -> tuple[LLaMA, dict[str, Any], bool]:
    """(model, variables ready to decode, whether adapters were loaded)."""
    on_accelerator = jax.default_backend() != "cpu"
    dtype = DTYPES.get(opts.dtype) or (jnp.bfloat16 if on_accelerator else jnp.float32)  # auto
    scan = (not on_accelerator) if opts.scan_layers is None else opts.scan_layers
    t0 = time.perf_counter()
    config, lora_config, variables, desc = load_for_generation(
        opts.checkpoint_dir, opts.pretrained_path, opts.adapters, opts.lora_path, opts.lora_alpha,
        param_dtype=dtype, scan_layers=scan)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model ({desc}) has "
                         f"vocab_size {config.vocab_size}")
    model = LLaMA(config, lora_config, dtype=dtype, param_dtype=dtype, scan_layers=scan)
    stored = stored_quantization(opts)
    mode = quantize_mode(opts.quantize)
    model, variables = prepare(model, variables, merge=not opts.unmerged, quantize=mode)
    jax.block_until_ready(variables)
    kernels = f", {stored['mode']} kernels (as stored)" if stored else f", {mode} kernels" if mode else ""
    unmerged = ""
    if "lora" in variables:
        unmerged = ", adapters unmerged" + ("" if opts.unmerged else " (on NF4 kernels, as QLoRA trains them)")
    print(f"model: {desc} ({jnp.dtype(dtype).name}{kernels}{unmerged}) loaded in {time.perf_counter() - t0:.1f} s; "
          f"tokenizer {tokenizer.path}", file=err)
    return model, variables, lora_config is not None


def quantize_mode(flag: str | None) -> str | None:
    """--quantize as a `jaxlora.model.quantize` mode (lit-llama's name llm.int8 is int8)."""
    return "int8" if flag == "llm.int8" else flag


def stored_quantization(opts: GenerateOptions) -> dict[str, str] | None:
    """The "quantized" record of a quantized jaxlora checkpoint given as the base (None: float
    weights), checked against --quantize: such a checkpoint serves only its own mode."""
    base = opts.checkpoint_dir or opts.pretrained_path or (opts.adapters and adapters_base(opts.adapters))
    stored = cio.read_quantized(base) if base and Path(base).is_dir() else None
    if stored is not None and opts.quantize is not None:
        check_mode(base, stored, quantize_mode(opts.quantize))
    return stored


def recorded_style(opts: GenerateOptions) -> tuple[str | None, str]:
    """The prompt style the loaded adapters' config.json records ("prompt_style"), and that file."""
    directory = opts.adapters or opts.checkpoint_dir
    if directory is None:
        return None, ""
    path = Path(directory) / cio.CONFIG_FILE
    return read_json(path).get("prompt_style"), str(path)


def choose_style(opts: GenerateOptions, is_demo: bool, has_adapters: bool, tokenizer: TextTokenizer,
                 ) -> tuple[str, str]:
    """(style, why) for --prompt_style auto: the style adapters were trained with (lit-llama's
    Alpaca unless they record another), the model's own chat template for a model that ships one
    (an instruct model: tuned to it), else the prompt continued as is (lit-llama's generate.py)."""
    if opts.prompt_style != "auto":
        return opts.prompt_style, "--prompt_style"
    if is_demo:
        return "alpaca", "the demo's adapters are trained with it"
    files = tokenizer.model_files
    if has_adapters:
        recorded, path = recorded_style(opts)
        if recorded:
            return recorded, f"the adapters were trained with it ({path})"
        if opts.adapters and adapters_format(opts.adapters) == "peft":
            if files.chat_template is not None:
                return "chat-template", (f"PEFT adapters record no prompt format and the model ships a chat template "
                                         f"({files.chat_template_source}); --prompt_style names another")
            return "alpaca", "PEFT adapters record no prompt format: lit-llama's Alpaca; --prompt_style names another"
        return "alpaca", "adapters from train.py, lit-llama and litgpt are trained with the Alpaca template by default"
    if files.chat_template is not None:
        return "chat-template", f"the model ships a chat template ({files.chat_template_source}) and no adapters"
    return "plain", "a model without adapters or a chat template continues the prompt as is"


def prompt_text(opts: GenerateOptions, style: PromptStyle, err: TextIO) -> Rendered:
    """The prompt the model continues, in `style`; says on `err` what it was asked."""
    if style.name == "plain" and not opts.input:
        print(f"prompt (continued as is): {opts.prompt}", file=err)
    else:
        print(f"instruction: {opts.prompt}" + (f"\ninput: {opts.input}" if opts.input else ""), file=err)
    return style.render({"instruction": opts.prompt, "input": opts.input, "system": opts.system})


def run(options: GenerateOptions, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The session: the samples' text on `out` (only that), everything else on `err`
    (default: sys.stdout and sys.stderr as they are at the call)."""
    out, err = out or sys.stdout, err or sys.stderr
    opts, notes = with_defaults(options)
    sampling, _, tokenizer = check_options(opts)
    for note in notes:
        print(note, file=err)
    model, variables, has_adapters = load_model(opts, tokenizer, err)
    name, why = choose_style(opts, options.is_demo, has_adapters, tokenizer)
    style = get_style(name, tokenizer)
    print(f"prompt style: {name} ({why})", file=err)
    rendered = prompt_text(opts, style, err)
    ids, stop_ids = encode_prompt(rendered, tokenizer), style.stop_ids(tokenizer)
    with CompileClock() as compile_clock:
        for i in range(opts.num_samples):
            clock = SampleClock(compile_clock)
            stream = TextStream(tokenizer.decode, out, on_first=clock.first_token)
            new = generate(model, variables, [ids], opts.max_new_tokens, sampling, eos_id=stop_ids,
                           vocab_size=tokenizer.vocab_size, seed=opts.seed + i, on_tokens=stream)[0]
            clock.stop(len(new))
            stream.finish(new)
            print(clock.summary(i + 1), file=err)
    return 0
