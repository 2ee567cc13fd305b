"""``dhsa-export`` command line: thin Click commands over the Python API.

Every user-fixable problem surfaces as one line ``dhsa-export: error: ...`` on stderr and exit
code 2; nothing here holds logic the Python API lacks.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Callable

import click

from . import __version__
from .config import ATTENTION_BACKENDS, CHUNK_SCORES, DEVICES, DTYPES, HEAD_ROUTING, PATTERNS, DHSAConfig
from .errors import DHSAError

EXIT_USER_ERROR = 2


def fail(message: str) -> None:
    click.echo(f"dhsa-export: error: {message}", err=True)
    sys.exit(EXIT_USER_ERROR)


def user_errors(command: Callable) -> Callable:
    """Turn DHSAError into one line on stderr and a non-zero exit."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except DHSAError as exc:
            fail(str(exc))

    return wrapper


def quiet_transformers() -> None:
    """transformers' warnings and weight-loading bars are noise for CLI users."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def model_options(command: Callable) -> Callable:
    command = click.option("--layers", type=int, default=None,
                           help="Keep only the first N decoder layers (shape/speed work).")(command)
    command = click.option("--model", "model_spec", default=None, metavar="M",
                           help="Recipe name (default smollm2-135m), NAME:random, HF folder or .gguf file.")(command)
    return command


def dhsa_options(command: Callable) -> Callable:
    """Options that build a DHSAConfig (validated there, so errors name the value)."""
    defaults = DHSAConfig()
    options = [
        click.option("--attention", type=click.Choice(["dense", "dhsa"]), default="dhsa", show_default=True),
        click.option("--pattern", type=click.Choice(PATTERNS), default=defaults.pattern, show_default=True),
        click.option("--density", type=float, default=defaults.density, show_default=True,
                     help="Budget as a fraction of the full key range, in (0, 1]."),
        click.option("--q-block", type=int, default=defaults.q_block, show_default=True),
        click.option("--k-block", type=int, default=defaults.k_block, show_default=True),
        click.option("--head-routing", type=click.Choice(HEAD_ROUTING), default=defaults.head_routing,
                     show_default=True, help="Route per query head or per KV group."),
        click.option("--boundary-predictor", default="", metavar="FILE",
                     help="Trained boundary predictor for --pattern dynamic."),
        click.option("--chunk-score", type=click.Choice(CHUNK_SCORES), default=defaults.chunk_score,
                     show_default=True,
                     help="How --pattern dynamic ranks chunks: estimated attention mass, or the paper's mean key."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def runtime_options(command: Callable) -> Callable:
    """Where the PyTorch model runs and which DHSA attention implementation it uses."""
    options = [
        click.option("--backend", type=click.Choice(("auto",) + ATTENTION_BACKENDS), default="auto", show_default=True,
                     help="DHSA attention: auto (CUDA kernel on a GPU, torch-gather on the CPU), reference, "
                          "torch-gather, or torch-cuda (the CUDA kernels; implies --device cuda)."),
        click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                     help="auto: cuda with --backend torch-cuda, else cpu."),
        click.option("--dtype", type=click.Choice(DTYPES), default="auto",
                     show_default=True, help="auto: float32 on the CPU, bfloat16 on CUDA."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def load_placed_model(model_spec, layers, backend: str, device: str, dtype: str):
    """Check the placement first (a missing GPU fails before any loading), then load and move."""
    from .hf.models import load_model, place_model, resolve_placement

    device, dtype = resolve_placement(device, dtype, backend)
    return place_model(load_model(model_spec, layers=layers, dtype=dtype), device)


def build_config(pattern, density, q_block, k_block, head_routing, boundary_predictor,
                 chunk_score=DHSAConfig.chunk_score) -> DHSAConfig:
    return DHSAConfig(density=density, q_block=q_block, k_block=k_block, pattern=pattern,
                      head_routing=head_routing, boundary_predictor=boundary_predictor,
                      chunk_score=chunk_score)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dhsa-export")
def main() -> None:
    """Deploy long-context LLaMA-family models with Dynamic Hierarchical Sparse Attention."""


@main.command()
@model_options
@dhsa_options
@click.option("--prompt", required=True, help="Prompt text (chat template applied unless --raw).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--raw", is_flag=True, help="Feed the prompt as is, without the chat template.")
@click.option("--stats", is_flag=True, help="Print the achieved causal-block fraction to stderr.")
@runtime_options
@user_errors
def generate(model_spec, layers, attention, pattern, density, q_block, k_block, head_routing,
             boundary_predictor, chunk_score, prompt, max_new_tokens, raw, stats, backend, device, dtype) -> None:
    """Generate greedily from a prompt with dense or DHSA attention."""
    cfg = build_config(pattern, density, q_block, k_block, head_routing, boundary_predictor, chunk_score)
    quiet_transformers()
    from .hf.generate import generate as run_generate
    from .hf.generate import set_attention

    loaded = load_placed_model(model_spec, layers, backend, device, dtype)
    runtime = set_attention(loaded, attention, cfg, backend=backend)
    result = run_generate(loaded, [prompt], max_new_tokens=max_new_tokens, raw=raw)[0]
    click.echo(result.text)
    if stats and runtime is not None:
        click.echo(f"prompt tokens: {result.prompt_tokens}, causal block fraction: "
                   f"{runtime.stats.causal_block_fraction:.3f}", err=True)


@main.group(name="eval")
def eval_group() -> None:
    """Accuracy evaluations (needle in a haystack)."""


def parse_int_list(value: str, name: str) -> list[int]:
    try:
        items = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise DHSAError(f"{name} {value!r} is not a comma-separated list of integers; pass e.g. 2048,4096") from None
    if not items or any(item <= 0 for item in items):
        raise DHSAError(f"{name} {value!r} must list positive integers; pass e.g. 2048,4096")
    return items


def parse_depths(value: str) -> list[float]:
    try:
        depths = [float(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise DHSAError(f"depths {value!r} is not a comma-separated list of percentages; pass e.g. 0,50,100") from None
    if not depths or any(not 0 <= depth <= 100 for depth in depths):
        raise DHSAError(f"depths {value!r} must be percentages within 0..100; pass e.g. 0,50,100")
    return depths


PAPER_DEPTHS = ",".join(str(d) for d in range(0, 100, 11)) + ",100"


@eval_group.command()
@model_options
@dhsa_options
@click.option("--haystack-dir", default=None, metavar="DIR",
              help="Folder of .txt files (default: a generated filler haystack).")
@click.option("--context-lengths", default="2048,4096", show_default=True)
@click.option("--depths", default=PAPER_DEPTHS, show_default=True, help="Needle depths in percent.")
@click.option("--task", type=click.Choice(["paper", "magic-number"]), default="paper", show_default=True,
              help="The paper's San Francisco needle, or a RULER-style magic number.")
@click.option("--needle", default=None, help="Custom needle sentence (with --question).")
@click.option("--question", default=None, help="Question for a custom needle.")
@click.option("--answer", "answers", multiple=True, help="Keyword the answer must contain (repeatable).")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--out", "out_dir", required=True, metavar="DIR", help="Writes results.json and heatmap.png.")
@runtime_options
@user_errors
def niah(model_spec, layers, attention, pattern, density, q_block, k_block, head_routing,
         boundary_predictor, chunk_score, haystack_dir, context_lengths, depths, task, needle, question,
         answers, max_new_tokens, out_dir, backend, device, dtype) -> None:
    """Needle-in-a-haystack retrieval over context lengths x depths."""
    cfg = build_config(pattern, density, q_block, k_block, head_routing, boundary_predictor, chunk_score)
    lengths = parse_int_list(context_lengths, "context lengths")
    depth_list = parse_depths(depths)
    quiet_transformers()
    from .eval import PAPER_NEEDLE, NeedleTask, magic_number_task, run_niah

    if needle or question:
        if not (needle and question):
            raise DHSAError("a custom needle needs both --needle and --question")
        keywords = list(answers) or [needle.rstrip(".")]
        needle_task = NeedleTask(needle=needle, question=question, answer_keywords=keywords, assistant_prefix="")
    else:
        needle_task = PAPER_NEEDLE if task == "paper" else magic_number_task(seed=0)
    loaded = load_placed_model(model_spec, layers, backend, device, dtype)
    results = run_niah(loaded, attention=attention, dhsa_config=cfg, haystack_dir=haystack_dir,
                       context_lengths=lengths, depths=depth_list, task=needle_task, out_dir=out_dir,
                       max_new_tokens=max_new_tokens, backend=backend)
    fraction = results.get("causal_block_fraction")
    suffix = f", causal block fraction {fraction:.3f}" if fraction is not None else ""
    click.echo(f"mean score {results['mean_score']:.3f} over {len(results['cells'])} cells{suffix}; "
               f"wrote {out_dir}/results.json and {out_dir}/heatmap.png")


@main.command(name="train-boundaries")
@click.option("--model", "model_spec", default=None, metavar="M", help="Model whose attention gives the labels.")
@click.option("--data", "data_dir", required=True, metavar="DIR", help="Folder of .txt training text.")
@click.option("--out", "out_path", required=True, metavar="FILE", help="Predictor file (.safetensors).")
@click.option("--max-tokens", type=int, default=65536, show_default=True)
@click.option("--seq-len", type=int, default=1024, show_default=True)
@click.option("--epochs", type=int, default=5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@user_errors
def train_boundaries(model_spec, data_dir, out_path, max_tokens, seq_len, epochs, seed) -> None:
    """Train the learned chunk-boundary predictor for the dynamic pattern (CPU is enough)."""
    for name, value in (("max-tokens", max_tokens), ("seq-len", seq_len), ("epochs", epochs)):
        if value <= 0:
            raise DHSAError(f"--{name} {value} must be positive")
    quiet_transformers()
    from .train.boundaries import train_boundaries as run_training

    metrics = run_training(model_spec, data_dir, out_path, max_tokens=max_tokens, seq_len=seq_len,
                           epochs=epochs, seed=seed)
    click.echo(json.dumps(metrics, indent=2, default=str))


@main.command()
@model_options
@dhsa_options
@click.option("--backend", type=click.Choice(["ort-cpu", "trt"]), default="ort-cpu", show_default=True)
@click.option("--int4", is_flag=True, help="4-bit weight-only quantization of the linear layers (MatMulNBits).")
@click.option("--int4-block-size", type=int, default=32, show_default=True)
@click.option("--int4-lm-head", is_flag=True, help="Quantize the output projection too.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Graph dtype: ort-cpu float32; trt float16 (default) or bfloat16.")
@click.option("--max-tokens", type=int, default=None,
              help="trt: the engines' longest prompt (default: the model's maximum, at most 32768).")
@click.option("--cuda-arch", "cuda_arch", default=None, metavar="LIST",
              help="trt: CUDA architectures of the kernels, e.g. 80,90 (default: the visible GPUs, else 80,86,89,90).")
@click.option("-o", "--output", "out_dir", default="dhsa-artifact", show_default=True, metavar="DIR")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@user_errors
def build(model_spec, layers, attention, pattern, density, q_block, k_block, head_routing,
          boundary_predictor, chunk_score, backend, int4, int4_block_size, int4_lm_head, dtype, max_tokens,
          cuda_arch, out_dir, force) -> None:
    """Build a deployable artifact: ONNX graphs, weights, custom-op library (ort-cpu) or TensorRT plugin and
    engines (trt), tokenizer, manifest."""
    if attention != "dhsa":
        raise DHSAError("build exports DHSA prefill graphs; drop --attention dense")
    cfg = build_config(pattern, density, q_block, k_block, head_routing, boundary_predictor, chunk_score)
    quiet_transformers()
    from .build import BuildOptions
    from .build import build as run_build

    path = run_build(BuildOptions(model_spec=model_spec, layers=layers, backend=backend, int4=int4,
                                  int4_block_size=int4_block_size, int4_lm_head=int4_lm_head, cfg=cfg,
                                  out=out_dir, force=force, dtype=dtype, max_tokens=max_tokens,
                                  cuda_archs=tuple(a.strip() for a in cuda_arch.split(",")) if cuda_arch else None))
    click.echo(f"built {path}")


@main.command()
@click.argument("input_path", metavar="IN.onnx")
@click.argument("output_path", metavar="OUT.onnx")
@dhsa_options
@click.option("--verbose", is_flag=True, help="Also list every candidate a rule left alone, with the reason.")
@user_errors
def rewrite(input_path, output_path, attention, pattern, density, q_block, k_block, head_routing,
            boundary_predictor, chunk_score, verbose) -> None:
    """Rewrite a foreign dense ONNX decoder (torch.onnx, onnxruntime-genai builder) into the DHSA prefill graph."""
    if attention != "dhsa":
        raise DHSAError("rewrite produces DHSA prefill graphs; drop --attention dense")
    cfg = build_config(pattern, density, q_block, k_block, head_routing, boundary_predictor, chunk_score)
    from .onnx.rewrite import rewrite_model

    report = rewrite_model(input_path, output_path, cfg)
    for line in report.lines(verbose):
        click.echo(line)
    if report.chunked_layers:
        click.echo(f"dynamic: one dhsa::ChunkOffsets node on layer 0's keys feeds {report.chunked_layers} layers")
    if report.dropped_inputs:
        click.echo(f"inputs no longer used (prefill has no past): {', '.join(report.dropped_inputs)}")
    data = f" (+ {report.output.name}.data)" if report.external_data else ""
    click.echo(f"wrote {report.output}{data}: {report.total} attention layers rewritten")


@main.command()
@click.argument("artifact", metavar="DIR")
@click.option("--prompt", default=None, help="Prompt text.")
@click.option("--prompt-file", type=click.Path(dir_okay=False), default=None, help="Read the prompt from a file.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--raw", is_flag=True, help="Feed the prompt as is, without the chat template.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads.")
@user_errors
def run(artifact, prompt, prompt_file, max_new_tokens, raw, threads) -> None:
    """Generate from a built artifact, streaming tokens (manifest verified first)."""
    if (prompt is None) == (prompt_file is None):
        raise DHSAError("pass exactly one of --prompt TEXT or --prompt-file FILE")
    if prompt_file is not None:
        from pathlib import Path

        if not Path(prompt_file).is_file():
            raise DHSAError(f"prompt file {prompt_file!r} does not exist")
        prompt = Path(prompt_file).read_text()
    if max_new_tokens < 1:
        raise DHSAError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    quiet_transformers()
    from .backends.ort_cpu.generate import generate_tokens, open_artifact
    from .hf.generate import prompt_text

    sessions = open_artifact(artifact, threads=threads)
    tokenizer = sessions.tokenizer
    ids = tokenizer(prompt_text(tokenizer, prompt, raw), add_special_tokens=False)["input_ids"]
    emitted: list[int] = []
    printed = [""]

    def stream(token: int) -> None:
        emitted.append(token)
        text = tokenizer.decode(emitted, skip_special_tokens=True)
        click.echo(text[len(printed[0]):], nl=False)
        printed[0] = text

    generate_tokens(sessions, ids, max_new_tokens, on_token=stream)
    click.echo()


@main.command()
@click.argument("artifact", metavar="DIR")
@click.option("--json", "json_path", default=None, metavar="FILE", help="Write the report as JSON.")
@click.option("--lengths", default="96,700,1500", show_default=True, help="Prompt lengths to compare on.")
@click.option("--save-outputs", default=None, metavar="FILE",
              help="Save both runners' outputs (Polygraphy RunResults JSON; 'polygraphy inspect data FILE').")
@user_errors
def check(artifact, json_path, lengths, save_outputs) -> None:
    """Polygraphy accuracy check: ONNX Runtime (custom ops) against the PyTorch reference."""
    quiet_transformers()
    from .check.compare import check_artifact

    report = check_artifact(artifact, parse_int_list(lengths, "lengths"), json_path, save_outputs)
    worst = max(report["outputs"], key=lambda r: r["max_abs_error"])
    status = "PASSED" if report["passed"] else "FAILED"
    click.echo(f"{status}: {len(report['outputs'])} outputs on prompts of {report['prompt_lengths']} tokens; "
               f"worst {worst['name']} max abs {worst['max_abs_error']:.3g}, max rel {worst['max_rel_error']:.3g} "
               f"(atol {report['tolerances']['atol']}, rtol {report['tolerances']['rtol']})")
    if not report["passed"]:
        sys.exit(1)


@main.group()
def bench() -> None:
    """Speed benchmarks against dense baselines in the same run (GPU: torch-cuda backend)."""


def require_cuda(backend: str) -> None:
    import torch

    if backend != "torch-cuda":
        raise DHSAError(f"bench backend {backend!r} is not supported; use --backend torch-cuda")
    if not torch.cuda.is_available():
        raise DHSAError("--backend torch-cuda needs a CUDA GPU and a CUDA build of torch; none is visible here")


def write_json(path: str | None, data: dict) -> None:
    if path:
        from pathlib import Path

        Path(path).write_text(json.dumps(data, indent=2))


@bench.command(name="attention")
@click.option("--backend", default="torch-cuda", show_default=True)
@click.option("--shape", default="llama3.1-8b", show_default=True, help="Recipe whose head shape is used.")
@click.option("--tokens", default="8192,32768,65536,131072", show_default=True)
@click.option("--density", type=float, default=0.125, show_default=True)
@click.option("--pattern", type=click.Choice(PATTERNS), default="vslash", show_default=True)
@click.option("--repeats", type=int, default=5, show_default=True)
@click.option("--json", "json_path", default=None, metavar="FILE")
@user_errors
def bench_attention_command(backend, shape, tokens, density, pattern, repeats, json_path) -> None:
    """One attention layer: DHSA routing + kernel vs SDPA causal and FlexAttention (same selection)."""
    DHSAConfig(density=density, pattern=pattern)
    lengths = parse_int_list(tokens, "tokens")
    if repeats < 5:
        raise DHSAError(f"--repeats {repeats} is below 5; medians need at least 5 timed runs")
    require_cuda(backend)
    from .bench.attention import bench_attention, markdown_table

    result = bench_attention(lengths, shape=shape, density=density, pattern=pattern, repeats=repeats)
    write_json(json_path, result)
    click.echo(markdown_table(result["rows"]))


@bench.command(name="prefill")
@click.option("--backend", default="torch-cuda", show_default=True)
@click.option("--model", "model_spec", default="llama3.1-8b:random", show_default=True)
@click.option("--layers", type=int, default=2, show_default=True)
@click.option("--tokens", default="32768,131072", show_default=True)
@click.option("--density", type=float, default=0.125, show_default=True)
@click.option("--pattern", type=click.Choice(PATTERNS), default="vslash", show_default=True)
@click.option("--repeats", type=int, default=5, show_default=True)
@click.option("--json", "json_path", default=None, metavar="FILE")
@user_errors
def bench_prefill_command(backend, model_spec, layers, tokens, density, pattern, repeats, json_path) -> None:
    """Whole-model prefill, dense vs DHSA (random weights of the recipe's exact shape)."""
    DHSAConfig(density=density, pattern=pattern)
    lengths = parse_int_list(tokens, "tokens")
    require_cuda(backend)
    from .bench.prefill import bench_prefill, markdown_table

    result = bench_prefill(model=model_spec, layers=layers, tokens=lengths, density=density,
                           pattern=pattern, repeats=repeats)
    write_json(json_path, result)
    click.echo(markdown_table(result["rows"]))


@bench.command(name="memory")
@click.option("--backend", default="torch-cuda", show_default=True)
@click.option("--model", "model_spec", default="llama3.1-8b:random", show_default=True)
@click.option("--layers", type=int, default=None, help="Default: all of the recipe's layers.")
@click.option("--tokens", type=int, default=100_000, show_default=True, help="Prompt length.")
@click.option("--decode-tokens", type=int, default=16, show_default=True)
@click.option("--budget-gib", type=float, default=24.0, show_default=True,
              help="GPU memory cap (torch.cuda.set_per_process_memory_fraction).")
@click.option("--int4/--no-int4", default=True, show_default=True,
              help="INT4 weights for the chunked configs (the plain model is always bf16).")
@click.option("--int4-block-size", type=int, default=32, show_default=True)
@click.option("--chunk-tokens", type=int, default=8192, show_default=True,
              help="Positions per MLP / norm chunk in chunked prefill.")
@click.option("--configs", default="dhsa-chunked-int4,dense-chunked-int4,dense-int4,plain-bf16", show_default=True)
@click.option("--density", type=float, default=0.125, show_default=True)
@click.option("--pattern", type=click.Choice(PATTERNS), default="vslash", show_default=True)
@click.option("--json", "json_path", default=None, metavar="FILE")
@user_errors
def bench_memory_command(backend, model_spec, layers, tokens, decode_tokens, budget_gib, int4, int4_block_size,
                         chunk_tokens, configs, density, pattern, json_path) -> None:
    """Long-context prefill + decode under a GPU memory budget: DHSA, dense and the plain model."""
    import os

    DHSAConfig(density=density, pattern=pattern)
    if tokens < 1 or decode_tokens < 0 or budget_gib <= 0:
        raise DHSAError(f"--tokens {tokens} and --budget-gib {budget_gib} must be positive and "
                        f"--decode-tokens {decode_tokens} non-negative")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts
    require_cuda(backend)
    from .bench.memory import bench_memory, markdown_table, parse_configs

    result = bench_memory(model=model_spec, layers=layers, tokens=tokens, decode_tokens=decode_tokens,
                          budget_gib=budget_gib, configs=parse_configs(configs), chunk_tokens=chunk_tokens,
                          block_size=int4_block_size, density=density, pattern=pattern, int4=int4)
    write_json(json_path, result)
    click.echo(markdown_table(result["rows"]))


@main.command()
@click.option("--sanitize", is_flag=True, help="Build the AddressSanitizer + UBSan variant instead.")
@user_errors
def setup(sanitize: bool) -> None:
    """Install step for the native parts: fetch the pinned ONNX Runtime headers and compile the
    custom-op library now (otherwise the first build or run does it)."""
    from .backends.ort_cpu import build_library, kernel_isa

    library = build_library(sanitize=sanitize)
    click.echo(f"ONNX Runtime CPU custom-op library: {library} (kernels: {kernel_isa(library)})")


@main.command()
def models() -> None:
    """List the model recipes."""
    from .hf.recipes import DEFAULT_MODEL, load_recipe, recipe_names

    for name in recipe_names():
        recipe = load_recipe(name)
        marker = " (default)" if name == DEFAULT_MODEL else ""
        click.echo(f"{name:14s} {recipe.architecture:20s} {recipe.description}{marker}")


if __name__ == "__main__":  # pragma: no cover
    main()
