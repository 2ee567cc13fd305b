"""Needle tasks, haystack text and length-exact needle-in-a-haystack prompts.

The protocol follows the paper (and the LLMTest_NeedleInAHaystack harness it used): the haystack
is cut to fit the requested context length, the needle is inserted at ``depth`` percent of the
context right after the last sentence end ('.') before that point, the question follows the
context, and the assistant's answer is primed with a prefix. Unlike the published code, nothing of
the chat template (BOS included), the needle, the question or the answer prefix is ever truncated:
only haystack tokens are trimmed, and the whole prompt is measured with the same tokenization
:func:`dhsa_export.hf.generate.generate` uses, so it never exceeds ``context_length`` tokens.
"""

from __future__ import annotations

import bisect
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DHSAError
from ..hf.generate import prompt_text

#: Appended to the question (the wording of the paper's harness).
INSTRUCTION = "Don't give information outside the document or repeat your findings."

#: RULER's noise haystack, used by :func:`default_haystack_text`.
DEFAULT_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


@dataclass
class NeedleTask:
    """What is hidden in the haystack and how it is asked for.

    Attributes:
        needle: the sentence inserted into the haystack.
        question: asked after the context (the instruction :data:`INSTRUCTION` is appended).
        answer_keywords: the score of a response is the fraction of these (case-insensitive)
            found in ``assistant_prefix + response``; each must occur in the needle.
        assistant_prefix: the start of the assistant's answer, put in the prompt after the
            generation prompt so that greedy decoding continues it.
    """

    needle: str
    question: str
    answer_keywords: list[str] = field(default_factory=list)
    assistant_prefix: str = ""

    def __post_init__(self) -> None:
        if not self.needle.strip() or not self.question.strip():
            raise DHSAError("a needle task needs a non-empty needle and question")
        if not self.answer_keywords:
            raise DHSAError(f"needle task {self.needle!r} has no answer keywords; pass at least one")
        needle, prefix = _normalize(self.needle), _normalize(self.assistant_prefix)
        for keyword in self.answer_keywords:
            word = _normalize(keyword)
            if not word or word not in needle:
                raise DHSAError(
                    f"answer keyword {keyword!r} does not occur in the needle {self.needle!r}; "
                    "pick keywords from the needle"
                )
            if word in prefix:
                raise DHSAError(
                    f"answer keyword {keyword!r} already occurs in the assistant prefix "
                    f"{self.assistant_prefix!r}, so every response would score it"
                )

    def to_dict(self) -> dict:
        return {
            "needle": self.needle,
            "question": self.question,
            "answer_keywords": list(self.answer_keywords),
            "assistant_prefix": self.assistant_prefix,
        }


PAPER_NEEDLE = NeedleTask(
    needle="The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
    question="What is the best thing to do in San Francisco?",
    answer_keywords=["sandwich", "dolores park", "sunny day"],
    assistant_prefix="The best thing to do in San Francisco is",
)

_ADJECTIVES = (
    "amber", "brave", "calm", "daring", "eager", "fancy", "gentle", "hollow", "icy", "jolly",
    "keen", "lively", "mellow", "noisy", "odd", "polite", "quiet", "rapid", "silent", "tidy",
    "upbeat", "vivid", "witty", "young", "zealous", "ancient", "bitter", "crisp", "dusty", "fierce",
)
_NOUNS = (
    "apartment", "bicycle", "canyon", "dolphin", "engine", "falcon", "garden", "harbor", "island",
    "jacket", "kettle", "lantern", "meadow", "notebook", "orchard", "pebble", "quarry", "river",
    "saddle", "teapot", "umbrella", "violin", "window", "yacht", "zeppelin", "anchor", "bridge",
    "castle", "desert", "feather",
)


def magic_number_task(seed: int) -> NeedleTask:
    """RULER-style single needle: a 7-digit "special magic number" for a random key (seeded)."""
    rng = random.Random(seed)
    word = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
    number = str(rng.randint(1_000_000, 9_999_999))
    return NeedleTask(
        needle=f"The special magic number for {word} is {number}.",
        question=f"What is the special magic number for {word}?",
        answer_keywords=[number],
        assistant_prefix=f"The special magic number for {word} is",
    )


def score_response(task: NeedleTask, response: str) -> float:
    """Fraction of ``task.answer_keywords`` found (case-insensitive) in prefix + response: [0, 1]."""
    text = _normalize(f"{task.assistant_prefix} {response}")
    found = sum(1 for keyword in task.answer_keywords if _normalize(keyword) in text)
    return found / len(task.answer_keywords)


def load_haystack_text(directory: str | Path) -> str:
    """The sorted ``*.txt`` files of ``directory`` concatenated (blank line between files)."""
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise DHSAError(
            f"haystack folder {str(directory)!r} does not exist; pass a folder of .txt files or "
            "leave it out to use the generated default haystack"
        )
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise DHSAError(
            f"haystack folder {str(directory)!r} has no .txt files; put the haystack text there "
            "as .txt files or leave it out to use the generated default haystack"
        )
    text = "\n\n".join(path.read_text(encoding="utf-8", errors="replace").strip() for path in files)
    if not text.strip():
        raise DHSAError(f"the .txt files of haystack folder {str(directory)!r} are all empty")
    return text


def default_haystack_text(repeats: int = 1000) -> str:
    """The fallback haystack when no folder is given: RULER's noise sentences, repeated.

    Deterministic and needs no data files (``repeats`` x about 25 tokens; :func:`build_prompt`
    repeats any haystack further when a context needs more).
    """
    return " ".join([DEFAULT_FILLER] * max(1, repeats))


def build_prompt(tokenizer, haystack_text: str, task: NeedleTask, context_length: int, depth: float) -> tuple[str, dict]:
    """A chat-templated NIAH prompt of at most ``context_length`` tokens, within a few of it.

    The user message is ``<context>\\n\\n<question> <instruction>``, followed by the generation
    prompt and ``task.assistant_prefix``. The context is a prefix of the haystack (repeated if too
    short) with the needle inserted at ``depth`` percent (0..100) of its tokens, right after the
    last '.' before that point (the paper's rule; at 100 the needle ends the context). Tokens are
    counted as :func:`dhsa_export.hf.generate.generate` counts them (``add_special_tokens=False``
    on the templated text), so template and BOS are counted once and never cut.

    Returns ``(prompt_text, info)`` with info keys ``prompt_tokens``, ``context_length``,
    ``depth``, ``haystack_tokens``, ``needle_token_index`` (haystack tokens before the needle),
    ``actual_depth`` (percent) and ``overhead_tokens`` (the prompt with an empty haystack).

    Raises:
        DHSAError: bad ``context_length``/``depth``, empty haystack, or a context too small to
            hold template + needle + question + answer prefix.
    """
    _check_context_length(context_length)
    _check_depth(depth)
    if not haystack_text or not haystack_text.strip():
        raise DHSAError("the haystack text is empty; pass a folder of non-empty .txt files")
    source = _Source(tokenizer, haystack_text, context_length + 1)

    def render(n: int) -> tuple[str, dict]:
        text, info = _render(tokenizer, source, task, n, depth)
        info["prompt_tokens"] = _count_tokens(tokenizer, text)
        return text, info

    best_text, best = render(0)
    if best["prompt_tokens"] > context_length:
        raise DHSAError(
            f"context length {context_length} is too small for the needle task: chat template, "
            f"needle, question and answer prefix alone take {best['prompt_tokens']} tokens; pass a "
            f"context length of at least {best['prompt_tokens']} (a useful haystack needs far more)"
        )
    overhead = best["prompt_tokens"]
    # Largest haystack prefix n whose prompt fits: secant steps on the token excess, bisection
    # as the fallback; [lo] always fits, [hi] is known (or assumed, past the end) not to.
    lo, hi = 0, min(source.num_tokens - 1, context_length) + 1
    guess = context_length - overhead
    while hi - lo > 1:
        if not lo < guess < hi:
            guess = (lo + hi) // 2
        text, info = render(guess)
        excess = info["prompt_tokens"] - context_length
        if excess <= 0:
            lo, best_text, best = guess, text, info
            if excess == 0:
                break
        else:
            hi = guess
        guess -= excess
    best["overhead_tokens"] = overhead
    best["context_length"] = context_length
    return best_text, best


class _Source:
    """A haystack prefix of at least ``needed`` tokens with the character span of every token."""

    def __init__(self, tokenizer, text: str, needed: int) -> None:
        chars = max(4096, 6 * needed)
        while True:
            self.text = _repeat_to(text, chars)
            if getattr(tokenizer, "is_fast", False):
                encoded = tokenizer(self.text, add_special_tokens=False, return_offsets_mapping=True)
                self.ends = [end for _, end in encoded["offset_mapping"]]
                self.starts = [start for start, _ in encoded["offset_mapping"]]
            else:  # slow tokenizers: spans from decoding prefixes (correct, slower)
                ids = tokenizer(self.text, add_special_tokens=False)["input_ids"]
                self.ends = [len(tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]
                self.starts = [0] + self.ends[:-1]
            # One spare token: the last one of a cut text may be a partial word.
            if len(self.ends) > needed or chars > 64 * needed + 65536:
                break
            chars *= 2

    @property
    def num_tokens(self) -> int:
        return len(self.ends)

    def prefix(self, n: int) -> str:
        return self.text[: self.ends[n - 1]] if n > 0 else ""


def _render(tokenizer, source: _Source, task: NeedleTask, n: int, depth: float) -> tuple[str, dict]:
    context = source.prefix(n)
    if n == 0 or depth >= 100:
        position = len(context)
    else:
        target = source.starts[int(n * depth / 100)]
        position = context.rfind(".", 0, target) + 1  # 0 when no sentence ends before the point
    before, after = context[:position], context[position:]
    joined = before
    if before and not before[-1].isspace():
        joined += " "
    joined += task.needle
    if after and not after[0].isspace():
        joined += " "
    joined += after
    needle_index = bisect.bisect_right(source.ends, position, 0, n)
    user = f"{joined}\n\n{task.question} {INSTRUCTION}"
    info = {
        "depth": depth,
        "haystack_tokens": n,
        "needle_token_index": needle_index,
        "actual_depth": 100.0 * needle_index / n if n else float(depth),
    }
    return _chat(tokenizer, user, task.assistant_prefix), info


def _chat(tokenizer, user: str, assistant_prefix: str) -> str:
    """Chat template + generation prompt + prefix; without a template, BOS (if the tokenizer adds one) + text."""
    if getattr(tokenizer, "chat_template", None):
        return prompt_text(tokenizer, user, assistant_prefix=assistant_prefix)
    text = prompt_text(tokenizer, f"{user}\n\n", raw=True, assistant_prefix=assistant_prefix)
    bos = getattr(tokenizer, "bos_token", None)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos and bos_id is not None and not text.startswith(bos):
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
        if ids and ids[0] == bos_id:
            text = bos + text
    return text


def _count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _repeat_to(text: str, chars: int) -> str:
    if len(text) >= chars:
        return text[:chars]
    copies = math.ceil(chars / (len(text) + 2))
    return "\n\n".join([text] * copies)[:chars]



def _check_context_length(context_length: int) -> None:
    if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length < 1:
        raise DHSAError(f"context length {context_length!r} must be a positive integer such as 4096")


def _check_depth(depth: float) -> None:
    if (
        not isinstance(depth, (int, float)) or isinstance(depth, bool) or math.isnan(depth)
        or not 0 <= depth <= 100
    ):
        raise DHSAError(f"depth {depth!r} is outside 0..100 (percent of the context); pass e.g. 50")
