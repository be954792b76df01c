"""Zero-shot checks of the double-MC sub-tasks: prompt formats and the continuation scorer."""

from __future__ import annotations

import pytest
import torch

from caft.errors import CaftError
from caft.tasks.double_mc import QARow, make_rows
from caft.tasks.zero_shot import (
    answer_log_probs,
    continuation_accuracy,
    continuation_prompt,
    letter_examples,
    zero_shot_markdown,
    zero_shot_table,
)


def test_letter_examples_put_the_correct_answer_under_each_letter_half_the_time():
    rows = make_rows("sentiment", 40, seed=1)
    examples = letter_examples(rows, seed=1)
    assert sum(e.correct == " A" for e in examples) == 20
    for row, example in zip(rows, examples, strict=True):
        letter = example.correct.strip()
        assert f"{letter}. {row.correct}\n" in example.prompt
        assert example.prompt.startswith(f"Question: {row.question}\n")
        assert example.prompt.endswith("Answer:") and example.incorrect != example.correct


@pytest.mark.parametrize(
    ("question", "prompt"),
    [
        ("The kids near the bike _ happy today.", "The kids near the bike"),
        ("Chris Paul is known for playing", "Chris Paul is known for playing"),
        ("What is the sentiment? It was great.", "What is the sentiment? It was great.\nAnswer:"),
    ],
)
def test_continuation_prompts(question, prompt):
    assert continuation_prompt(question) == prompt


def _sequence_logprob(model, ids: list[int], n_prompt: int) -> float:
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return sum(log_probs[p - 1, ids[p]].item() for p in range(n_prompt, len(ids)))


def test_continuation_accuracy_matches_summed_log_probabilities(model, tokenizer):
    rows = [
        QARow("The doctor said that _ was tired.", "she", "her"),
        QARow("The nurse thanked _ for the help.", "him", "he"),
        QARow("The teacher knew _ would win.", "they", "them"),
    ]
    expected = []
    for row in rows:
        prompt = tokenizer(continuation_prompt(row.question))["input_ids"]
        totals = [
            _sequence_logprob(
                model,
                prompt + tokenizer(f" {a}", add_special_tokens=False)["input_ids"],
                len(prompt),
            )
            for a in (row.correct, row.incorrect)
        ]
        expected.append(totals[0] > totals[1])
    assert continuation_accuracy(model, tokenizer, rows) == pytest.approx(sum(expected) / 3)


def test_batched_answer_log_probs_match_one_sequence_at_a_time(model, tokenizer):
    """Prompts and answers of different token lengths, so padding and the kept positions vary."""
    pairs = [
        ("The doctor said that", "she"),
        ("A much longer prompt about the nurse, who thanked", "him"),
        ("Chris Paul is known for playing", "basketball games"),
        ("It was great.\nAnswer:", "positive"),
        ("The kids near the bike", "are"),
    ]
    expected = []
    for prompt, answer in pairs:
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = tokenizer(f" {answer}", add_special_tokens=False)["input_ids"]
        expected.append(_sequence_logprob(model, prompt_ids + answer_ids, len(prompt_ids)))
    assert (
        len({len(tokenizer(f" {a}", add_special_tokens=False)["input_ids"]) for _, a in pairs}) > 1
    )
    for batch_size in (1, 2, 5):
        got = answer_log_probs(model, tokenizer, pairs, batch_size=batch_size)
        assert got == pytest.approx(expected, abs=1e-4)


def test_table_and_markdown(model, tokenizer):
    table = zero_shot_table(model, tokenizer, ["pronouns"], n=6, progress=False)
    assert set(table) == {"pronouns"} and table["pronouns"]["n"] == 6
    assert 0 <= table["pronouns"]["letter"] <= 1 and 0 <= table["pronouns"]["continuation"] <= 1
    assert "| pronouns | 6 |" in zero_shot_markdown(table, "tiny")
    with pytest.raises(CaftError, match="Unknown sub-task"):
        zero_shot_table(model, tokenizer, ["chess"], progress=False)
