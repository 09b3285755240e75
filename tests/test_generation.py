"""Text handed out by a Generation: stop strings found across token boundaries and never emitted, the
hold-back only as long as a stop could still complete, and bounded stop lists."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.serve.tiny_chat import build_tokenizer
from zipmoe.errors import ZipMoEError
from zipmoe.generation import (
    MAX_STOP_CHARS,
    MAX_STOPS,
    Generation,
    ModelHandle,
    SamplingParams,
    _stop_holdback,
)

TOKENIZER = build_tokenizer(160)
EOS = 2  # <|im_end|>


class ScriptedModel:
    """A stand-in causal LM whose greedy choice at step i is script[i] (the cache is the step index)."""

    device = torch.device("cpu")
    config = SimpleNamespace(max_position_embeddings=256)

    def __init__(self, script: list[int]):
        self.script = script

    def __call__(self, input_ids, cache, use_cache, logits_to_keep):
        step = 0 if cache is None else cache + 1
        logits = torch.zeros(1, 1, len(TOKENIZER))
        logits[0, 0, self.script[step]] = 1.0
        return SimpleNamespace(logits=logits, cache=step)


def run(pieces: list[str], stop: tuple[str, ...], eos: bool = False) -> tuple[list[str], Generation]:
    """Generate `pieces` (one token each) with these stops; returns the deltas and the generation."""
    script = [TOKENIZER.convert_tokens_to_ids(p) for p in pieces] + ([EOS] if eos else [])
    handle = ModelHandle(ScriptedModel(script), TOKENIZER, "scripted", eos_ids=frozenset({EOS}))
    gen = Generation(handle, [5], SamplingParams(max_tokens=len(script), stop=stop))
    deltas = []
    while not gen.finished:
        deltas.append(gen.step())
    return deltas, gen


def test_a_stop_spanning_two_tokens_is_found_and_never_emitted():
    deltas, gen = run(["the", " cat", " sat", " on"], stop=("t s",))
    assert deltas == ["the", " ca", ""]  # " cat" ends with "t", a possible start of "t s": held back
    assert gen.text == "the ca" and gen.finish_reason == "stop"
    assert gen.result().completion_tokens == 3  # stopped at the token that completed the stop


def test_held_text_is_released_when_the_stop_does_not_complete():
    deltas, gen = run(["the", " cat", " on", " mat"], stop=("t s",))
    assert deltas == ["the", " ca", "t on", " mat"]
    assert gen.finish_reason == "length"
    deltas, gen = run(["the", " cat"], stop=("t s",), eos=True)  # EOS flushes what was held
    assert "".join(deltas) == "the cat" and gen.finish_reason == "stop"


def test_the_earliest_of_several_stops_wins():
    deltas, gen = run(["the", " cat", " sat"], stop=("sat", "he c", "cat"))
    assert "".join(deltas) == "t" and gen.text == "t"


def reference(pieces: list[str], stop: tuple[str, ...]) -> str:
    """What the deltas must add up to: the text up to the earliest stop, once any stop is complete."""
    for n in range(1, len(pieces) + 1):
        text = "".join(pieces[:n])
        hits = [i for s in stop if (i := text.find(s)) >= 0]
        if hits:
            return text[: min(hits)]
    return "".join(pieces)


PIECES = ["a", "b", " ", "t", "e", "s", "the", " cat", " a", " sat"]  # single tokens of the tiny vocabulary


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=12),
       st.lists(st.text(alphabet="ab tes", min_size=1, max_size=5), min_size=1, max_size=MAX_STOPS))
def test_streamed_text_equals_the_reference_cut(pieces, stops):
    deltas, gen = run(pieces, tuple(stops))
    assert "".join(deltas) == reference(pieces, tuple(stops)) == gen.text


def holdback_reference(text: str, stop: tuple[str, ...]) -> int:
    return max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab", max_size=30), st.lists(st.text(alphabet="ab", max_size=8), max_size=MAX_STOPS))
def test_holdback_equals_the_brute_force_longest_stop_prefix(text, stops):
    assert _stop_holdback(text, tuple(stops)) == holdback_reference(text, tuple(stops))


@pytest.mark.parametrize(
    ("stop", "message"),
    [(("a",) * (MAX_STOPS + 1), f"at most {MAX_STOPS} stop strings"),
     (("x" * (MAX_STOP_CHARS + 1),), f"at most {MAX_STOP_CHARS} characters")],
)
def test_stop_lists_are_bounded(stop, message):
    with pytest.raises(ZipMoEError, match=message):
        SamplingParams(stop=stop)
    SamplingParams(stop=("x" * MAX_STOP_CHARS,) * MAX_STOPS)  # the limits themselves are fine
