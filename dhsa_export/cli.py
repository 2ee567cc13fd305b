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
from .config import HEAD_ROUTING, PATTERNS, DHSAConfig
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
    ]
    for option in reversed(options):
        command = option(command)
    return command


def build_config(pattern, density, q_block, k_block, head_routing, boundary_predictor) -> DHSAConfig:
    return DHSAConfig(density=density, q_block=q_block, k_block=k_block, pattern=pattern,
                      head_routing=head_routing, boundary_predictor=boundary_predictor)


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
@user_errors
def generate(model_spec, layers, attention, pattern, density, q_block, k_block, head_routing,
             boundary_predictor, prompt, max_new_tokens, raw, stats) -> None:
    """Generate greedily from a prompt with dense or DHSA attention."""
    cfg = build_config(pattern, density, q_block, k_block, head_routing, boundary_predictor)
    quiet_transformers()
    from .hf.generate import generate as run_generate
    from .hf.generate import set_attention
    from .hf.models import load_model

    loaded = load_model(model_spec, layers=layers)
    runtime = set_attention(loaded, attention, cfg)
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
@user_errors
def niah(model_spec, layers, attention, pattern, density, q_block, k_block, head_routing,
         boundary_predictor, haystack_dir, context_lengths, depths, task, needle, question,
         answers, max_new_tokens, out_dir) -> None:
    """Needle-in-a-haystack retrieval over context lengths x depths."""
    cfg = build_config(pattern, density, q_block, k_block, head_routing, boundary_predictor)
    lengths = parse_int_list(context_lengths, "context lengths")
    depth_list = parse_depths(depths)
    quiet_transformers()
    from .eval.niah import PAPER_NEEDLE, NeedleTask, magic_number_task, run_niah
    from .hf.models import load_model

    if needle or question:
        if not (needle and question):
            raise DHSAError("a custom needle needs both --needle and --question")
        keywords = list(answers) or [needle.rstrip(".")]
        needle_task = NeedleTask(needle=needle, question=question, answer_keywords=keywords, assistant_prefix="")
    else:
        needle_task = PAPER_NEEDLE if task == "paper" else magic_number_task(seed=0)
    loaded = load_model(model_spec, layers=layers)
    results = run_niah(loaded, attention=attention, dhsa_config=cfg, haystack_dir=haystack_dir,
                       context_lengths=lengths, depths=depth_list, task=needle_task, out_dir=out_dir,
                       max_new_tokens=max_new_tokens)
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
def models() -> None:
    """List the model recipes."""
    from .hf.recipes import DEFAULT_MODEL, load_recipe, recipe_names

    for name in recipe_names():
        recipe = load_recipe(name)
        marker = " (default)" if name == DEFAULT_MODEL else ""
        click.echo(f"{name:14s} {recipe.architecture:20s} {recipe.description}{marker}")


if __name__ == "__main__":  # pragma: no cover
    main()
