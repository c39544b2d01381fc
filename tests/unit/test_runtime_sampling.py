"""numpy sampling with llama.cpp's parameter meanings: CTRL repetition penalty over a 64-token
window, top-k, top-p before temperature, greedy, seeded draws, and the validation of `Sampling`."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.errors import ValidationError
from appliance.runtime.engine import Sampling
from appliance.runtime.sampling import (
    CANDIDATES,
    PENALTY_WINDOW,
    Sampler,
    apply_repeat_penalty,
    softmax,
    top_candidates,
)


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits_once() -> None:
    logits = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    out = apply_repeat_penalty(logits, [0, 1, 0, 0], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]  # token 0 seen three times, penalized once
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.5]  # the caller's array is untouched
    assert apply_repeat_penalty(logits, [0, 1], 1.0) is logits


def test_penalty_window_holds_the_prompt_tail_and_generated_tokens() -> None:
    history = list(range(100))
    sampler = Sampler(Sampling(temperature=0.0, repeat_penalty=1e9), history)
    assert list(sampler.recent) == history[-PENALTY_WINDOW:]
    logits = np.zeros(200, dtype=np.float32)
    logits[99] = 5.0  # in the window: pushed below the unpenalized zeros
    logits[10] = 4.0  # outside the window (too old): untouched
    assert sampler(logits) == 10
    assert sampler.recent[-1] == 10 and len(sampler.recent) == PENALTY_WINDOW


def test_greedy_is_argmax_after_the_penalty() -> None:
    logits = np.array([1.0, 3.0, 2.9], dtype=np.float32)
    assert Sampler(Sampling(temperature=0.0))(logits) == 1
    assert Sampler(Sampling(temperature=0.0, repeat_penalty=1.1), [1])(logits) == 2


def test_top_k_keeps_the_k_most_likely_in_order() -> None:
    logits = np.array([0.1, 5.0, 3.0, 4.0, -1.0], dtype=np.float32)
    assert top_candidates(logits, 3, 1.0).tolist() == [1, 3, 2]
    assert top_candidates(logits, 0, 1.0).size == 5 and top_candidates(logits, 9, 1.0).size == 5


def test_top_p_keeps_the_smallest_set_that_reaches_p() -> None:
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs).astype(np.float32)
    assert top_candidates(logits, 0, 0.45).tolist() == [0]
    assert top_candidates(logits, 0, 0.6).tolist() == [0, 1]  # the token that crosses p is kept
    assert top_candidates(logits, 0, 0.96).tolist() == [0, 1, 2, 3]
    # after top-k the probabilities are renormalized over the k: 0.5/0.8 = 0.625 >= 0.6
    assert top_candidates(logits, 2, 0.6).tolist() == [0]


def test_top_p_widens_past_the_first_candidates_on_a_flat_distribution() -> None:
    logits = np.zeros(5000, dtype=np.float32)
    kept = top_candidates(logits, 0, 0.4501)
    assert kept.size == 2251 > CANDIDATES
    assert top_candidates(logits, 1000, 0.4501).size == 451


def test_seeded_draws_repeat_and_differ_between_seeds() -> None:
    logits = np.random.default_rng(0).normal(size=1000).astype(np.float32)

    def draws(seed: int) -> list[int]:
        sampler = Sampler(Sampling(temperature=1.0, seed=seed))
        return [sampler(logits) for _ in range(20)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)


def test_draws_follow_the_tempered_distribution_within_top_k() -> None:
    logits = np.array([2.0, 1.0, 0.0, -5.0], dtype=np.float32)
    sampler = Sampler(Sampling(temperature=0.5, top_k=3, seed=0))
    counts = np.bincount([sampler(logits) for _ in range(6000)], minlength=4)
    expected = softmax(logits[:3] / 0.5)
    assert counts[3] == 0
    assert np.abs(counts[:3] / counts.sum() - expected).max() < 0.02


def test_sampling_validated_normalizes() -> None:
    s = Sampling(temperature=1, top_p=1, repeat_penalty=1, stop=["a", "b"]).validated()  # type: ignore[arg-type]
    assert s == Sampling(temperature=1.0, top_p=1.0, repeat_penalty=1.0, stop=("a", "b"))
    assert isinstance(s.temperature, float) and s.stop == ("a", "b")
    assert Sampling(stop="x").validated().stop == ("x",)  # type: ignore[arg-type]


@pytest.mark.parametrize("field, value, allowed", [
    ("temperature", -0.1, "0 (greedy) to 10"), ("temperature", "hot", "0 (greedy) to 10"),
    ("temperature", float("nan"), "0 (greedy) to 10"), ("top_p", 0.0, "greater than 0, at most 1"),
    ("top_p", 1.5, "greater than 0, at most 1"), ("top_k", -1, "0 (off) or more"),
    ("top_k", 2.5, "0 (off) or more"), ("repeat_penalty", 0, "greater than 0"),
    ("max_tokens", 0, "1 or more"), ("max_tokens", True, "1 or more"),
    ("seed", -1, "0 to 4294967294"), ("seed", 2**32 - 1, "0 to 4294967294"),
    ("stop", ["ok", ""], "non-empty strings"), ("stop", ["x"] * 17, "up to 16"),
])
def test_sampling_errors_name_the_field_and_its_range(field: str, value: object, allowed: str) -> None:
    with pytest.raises(ValidationError) as err:
        Sampling(**{field: value}).validated()  # type: ignore[arg-type]
    assert field in str(err.value) and allowed in (err.value.hint or "")


def test_logit_bias_is_added_before_the_penalty_and_greedy() -> None:
    logits = np.array([1.0, 5.0, 2.0, 0.5], dtype=np.float32)
    banned = Sampling(temperature=0.0, logit_bias=((1, -100.0),)).validated()
    assert Sampler(banned)(logits) == 2
    forced = Sampling(temperature=0.0, logit_bias=((3, 100.0),)).validated()
    assert Sampler(forced)(logits) == 3
    assert logits[1] == 5.0  # the caller's logits are not changed
    drawn = Sampling(temperature=1.0, seed=3, logit_bias=((0, -100.0), (1, -100.0), (2, -100.0)))
    sampler = Sampler(drawn.validated())
    assert {sampler(logits) for _ in range(50)} == {3}


def test_logit_bias_is_normalized_from_json_shapes() -> None:
    s = Sampling(logit_bias={"7": 1, 3: -2.5}).validated()  # type: ignore[arg-type]
    assert s.logit_bias == ((3, -2.5), (7, 1.0))
    assert Sampling(logit_bias=None).validated().logit_bias == ()  # type: ignore[arg-type]


@pytest.mark.parametrize("value, words", [
    ({"x": 1}, "token id"), ({"-3": 1}, "token id"), ({"1.5": 1}, "token id"), ({" 5": 1}, "token id"),
    ({"5": 101}, "-100 to 100"), ({"5": -100.5}, "-100 to 100"), ({"5": True}, "-100 to 100"),
    ({"5": float("nan")}, "-100 to 100"), ({"5": "1"}, "-100 to 100"), ([5], "an object"),
    ({"5": 1, "05": 2}, "twice"), ({str(i): 1 for i in range(1025)}, "at most 1024"),
])
def test_logit_bias_errors_name_the_field(value: object, words: str) -> None:
    with pytest.raises(ValidationError) as err:
        Sampling(logit_bias=value).validated()  # type: ignore[arg-type]
    assert "logit_bias" in str(err.value) and words in str(err.value)
