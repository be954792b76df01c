"""Multiple-choice evaluation against the model's own logits, computed here one unpadded prompt at a
time; batching and left padding must not change a margin; the hooks on/off comparison must agree
with separate evaluations and measure a real change when the ablation changes the model.
"""

from __future__ import annotations

import pytest
import torch

import caft
from caft.ablation import count_hooks
from caft.evaluation import compare_hooks, evaluate_mc
from caft.tasks.gender import make_gender_splits
from conftest import tiny_llama


@pytest.fixture(scope="module")
def examples():
    """Both categories, both letters, prompts of several lengths."""
    examples = make_gender_splits(n_train=40, n_eval=24, seed=0).eval_sets["ood"]
    assert {e.category for e in examples} == {"nominative", "object"}
    assert {e.correct for e in examples} == {" A", " B"}
    return examples


@pytest.fixture(scope="module")
def model(tokenizer):
    """One tiny random Llama for the module; evaluation never changes its weights."""
    return tiny_llama(len(tokenizer))


@pytest.fixture(scope="module")
def off_log_probs(model, tokenizer, examples):
    return hand_log_probs(model, tokenizer, examples)


@pytest.fixture
def concepts():
    generator = torch.Generator().manual_seed(0)
    return caft.ConceptSet({0: torch.randn(8, 64, generator=generator), 1: torch.randn(8, 64)})


def letter_id(tokenizer, letter: str) -> int:
    (token,) = tokenizer(letter, add_special_tokens=False)["input_ids"]
    return token


@torch.no_grad()
def hand_log_probs(model, tokenizer, examples) -> torch.Tensor:
    """Next-token log-probabilities after each prompt, one prompt at a time, no padding."""
    rows = []
    for example in examples:
        ids = torch.tensor([tokenizer(example.prompt)["input_ids"]])
        rows.append(torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1))
    return torch.stack(rows)


def hand_margins(tokenizer, examples, log_probs) -> list[float]:
    return [
        (row[letter_id(tokenizer, e.correct)] - row[letter_id(tokenizer, e.incorrect)]).item()
        for e, row in zip(examples, log_probs, strict=True)
    ]


def test_accuracy_matches_the_models_own_a_versus_b_decisions(
    model, tokenizer, examples, off_log_probs
):
    margins = hand_margins(tokenizer, examples, off_log_probs)
    # The margins are decisive enough that rounding and batching cannot flip a decision.
    assert min(abs(m) for m in margins) > 1e-3
    right = [m > 0 for m in margins]
    result = evaluate_mc(model, tokenizer, examples, batch_size=8)
    assert result.n == len(examples)
    assert result.accuracy == pytest.approx(sum(right) / len(right), abs=1e-4)
    assert result.margins == pytest.approx(margins, abs=1e-4)
    assert 0 < result.accuracy < 1  # a random model: the comparison is not trivially all-or-none


def test_accuracy_by_category_matches_and_sums_to_the_total(
    model, tokenizer, examples, off_log_probs
):
    margins = hand_margins(tokenizer, examples, off_log_probs)
    result = evaluate_mc(model, tokenizer, examples)
    assert set(result.accuracy_by_category) == {"nominative", "object"}
    total = 0.0
    for category, accuracy in result.accuracy_by_category.items():
        picked = [m > 0 for e, m in zip(examples, margins, strict=True) if e.category == category]
        assert accuracy == pytest.approx(sum(picked) / len(picked), abs=1e-4)
        total += accuracy * len(picked)
    assert total / len(examples) == pytest.approx(result.accuracy, abs=1e-3)


def test_left_padded_batches_give_the_same_margins_as_one_by_one(model, tokenizer, examples):
    lengths = {len(tokenizer(e.prompt)["input_ids"]) for e in examples}
    assert len(lengths) > 1  # batches really need padding
    batched = evaluate_mc(model, tokenizer, examples, batch_size=len(examples))
    single = evaluate_mc(model, tokenizer, examples, batch_size=1)
    assert batched.margins == pytest.approx(single.margins, abs=1e-4)
    assert batched.accuracy == single.accuracy


def test_compare_hooks_agrees_with_separate_evaluations(model, tokenizer, examples, concepts):
    comparison = compare_hooks(model, tokenizer, examples, concepts, prefix_tokens=3)
    assert count_hooks(model) == 0
    off = evaluate_mc(model, tokenizer, examples)
    on = evaluate_mc(model, tokenizer, examples, concepts=concepts, prefix_tokens=3)
    assert count_hooks(model) == 0
    assert comparison.hooks_off.margins == pytest.approx(off.margins, abs=1e-4)
    assert comparison.hooks_on.margins == pytest.approx(on.margins, abs=1e-4)
    assert comparison.hooks_off.accuracy == off.accuracy
    assert comparison.hooks_on.accuracy == on.accuracy
    # The ablation really acted: hooks-on margins differ from hooks-off.
    assert on.margins != pytest.approx(off.margins, abs=1e-3)


def test_hook_kl_and_flip_rate_match_a_hand_computation(
    model, tokenizer, examples, concepts, off_log_probs
):
    comparison = compare_hooks(model, tokenizer, examples, concepts)
    off = off_log_probs
    with caft.ablate(model, concepts):
        on = hand_log_probs(model, tokenizer, examples)
    kl = (on.exp() * (on - off)).sum(-1)
    assert comparison.mean_kl == pytest.approx(kl.mean().item(), abs=1e-4)
    assert comparison.mean_kl > 1e-3
    flips = [
        (a > 0) != (b > 0)
        for a, b in zip(
            hand_margins(tokenizer, examples, off),
            hand_margins(tokenizer, examples, on),
            strict=True,
        )
    ]
    assert 0 <= comparison.answer_flip_rate <= 1
    assert comparison.answer_flip_rate == pytest.approx(sum(flips) / len(flips), abs=1e-4)
    summary = comparison.summary()
    assert summary["mean_kl_on_vs_off"] == comparison.mean_kl
    assert "margins" not in summary["hooks_on"]


def test_hooks_that_remove_nothing_give_zero_kl_and_no_flips(model, tokenizer, examples):
    """With every position inside the un-ablated prefix the hooks change nothing."""
    concepts = caft.ConceptSet({0: torch.randn(4, 64), 1: torch.randn(4, 64)})
    comparison = compare_hooks(model, tokenizer, examples, concepts, prefix_tokens=10_000)
    assert comparison.mean_kl == pytest.approx(0.0, abs=1e-6)
    assert comparison.answer_flip_rate == 0.0
    assert comparison.hooks_on.margins == pytest.approx(comparison.hooks_off.margins, abs=1e-4)
