"""Can a model do each double-MC sub-task on its own? Zero-shot accuracy, two ways.

A double-MC setting only makes an experiment if the model can learn both of its questions: if it
cannot answer the intended one, CAFT has nothing to steer towards. Before running a grid, check each
sub-dataset alone, without fine-tuning:

- **letter**: the single question in the double-MC prompt format (`A. x` / `B. y`, answer " A" or
  " B", options swapped in half the items) — what fine-tuning must teach; small models answer one
  letter to everything here, so ~0.5 is expected and says little;
- **continuation**: whether the model prefers the correct answer word as a continuation (the text
  up to the blank, or the question followed by "Answer:") — whether it *knows* the answer at all.
  Answers are scored by their summed token log-probabilities, so multi-token words count fully.

A sub-task near 0.5 on both is one the model cannot do; one high on continuation is learnable.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from caft.batching import encode_prompts, last_logits, model_device, pad_left
from caft.errors import CaftError
from caft.evaluation import evaluate_mc
from caft.tasks.base import MCExample
from caft.tasks.double_mc import BLANK, SUBTASKS, QARow, make_rows

SINGLE_FORMAT = "Question: {question}\nA. {option_a}\nB. {option_b}\nAnswer:"


def letter_examples(rows: Sequence[QARow], seed: int = 0) -> list[MCExample]:
    """One question per prompt in the double-MC letter format, the correct option swapped in half."""
    rng = random.Random(seed)
    swaps = [index % 2 == 1 for index in range(len(rows))]
    rng.shuffle(swaps)
    examples = []
    for row, swapped in zip(rows, swaps, strict=True):
        options = (row.incorrect, row.correct) if swapped else (row.correct, row.incorrect)
        prompt = SINGLE_FORMAT.format(
            question=row.question, option_a=options[0], option_b=options[1]
        )
        letter = "B" if swapped else "A"
        other = "A" if swapped else "B"
        examples.append(MCExample(prompt=prompt, correct=f" {letter}", incorrect=f" {other}"))
    return examples


def continuation_prompt(question: str) -> str:
    """The text a model continues with the answer: up to the blank; an unfinished sentence as it
    is ("... is known for playing"); a finished one followed by "Answer:"."""
    if BLANK in question:
        return question.split(BLANK, 1)[0].rstrip()
    question = question.rstrip()
    return f"{question}\nAnswer:" if question.endswith((".", "?", "!")) else question


@torch.no_grad()
def answer_log_probs(
    model, tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16
) -> list[float]:
    """Summed log-probability of each `answer` (a leading space added) after its `prompt`.

    Sequences are left-padded so every answer ends at the last position, and the LM head runs only
    on the last (longest answer + 1) positions: the vocabulary projection is most of the cost.
    """
    device = model_device(model)
    sequences, answer_lengths = [], []
    for prompt, answer in pairs:
        answer_ids = tokenizer(f" {answer}", add_special_tokens=False)["input_ids"]
        sequences.append(encode_prompts(tokenizer, [prompt])[0] + answer_ids)
        answer_lengths.append(len(answer_ids))
    totals: list[float] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        lengths = answer_lengths[start : start + batch_size]
        keep = max(lengths) + 1
        batch = {k: v.to(device) for k, v in pad_left(chunk, tokenizer.pad_token_id).items()}
        logits = last_logits(model, batch, keep).float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)  # predicts the last keep-1 tokens
        targets = batch["input_ids"][:, -(keep - 1) :]
        token_log_probs = log_probs.gather(-1, targets[..., None])[..., 0]
        totals.extend(
            token_log_probs[row, keep - 1 - n :].sum().item() for row, n in enumerate(lengths)
        )
    return totals


def continuation_accuracy(
    model, tokenizer, rows: Sequence[QARow], *, batch_size: int = 16, progress: bool = False
) -> float:
    """Fraction of rows whose correct answer word has the higher summed log-probability."""
    right = 0
    for start in tqdm(
        range(0, len(rows), batch_size), desc="continuations", disable=not progress, leave=False
    ):
        chunk = rows[start : start + batch_size]
        pairs = [
            (continuation_prompt(row.question), answer)
            for row in chunk
            for answer in (row.correct, row.incorrect)
        ]
        scores = answer_log_probs(model, tokenizer, pairs, batch_size=2 * len(chunk))
        right += sum(scores[2 * i] > scores[2 * i + 1] for i in range(len(chunk)))
    return right / len(rows)


def zero_shot_table(
    model,
    tokenizer,
    subtasks: Sequence[str] = SUBTASKS,
    *,
    n: int = 200,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """{sub-task: {"letter": acc, "continuation": acc, "n": n}} on caft's generated rows."""
    unknown = [s for s in subtasks if s not in SUBTASKS]
    if unknown:
        raise CaftError(f"Unknown sub-task(s) {unknown}; choose from {', '.join(SUBTASKS)}.")
    table = {}
    for subtask in tqdm(subtasks, desc="sub-tasks", disable=not progress):
        rows = make_rows(subtask, n, seed=seed)
        letter = evaluate_mc(model, tokenizer, letter_examples(rows, seed)).accuracy
        table[subtask] = {
            "letter": round(letter, 4),
            "continuation": round(continuation_accuracy(model, tokenizer, rows), 4),
            "n": len(rows),
        }
    return table


def zero_shot_markdown(table: dict[str, dict[str, float]], model_name: str) -> str:
    lines = [
        f"# Zero-shot accuracy of {model_name} on each double-MC sub-task",
        "",
        "letter: the single question in the double-MC letter format (learned only by fine-tuning "
        "in small models); continuation: the correct answer word preferred as a continuation.",
        "",
        "| sub-task | n | letter format | continuation |",
        "|---|---|---|---|",
    ]
    for subtask, row in table.items():
        lines.append(
            f"| {subtask} | {row['n']} | {row['letter']:.3f} | {row['continuation']:.3f} |"
        )
    return "\n".join([*lines, ""])
