"""Tokenizing and batching prompts the same way for training, evaluation and discovery."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from caft.errors import CaftError


def single_token_id(tokenizer, text: str) -> int:
    """The id of `text` as one token (e.g. " A"); multiple-choice scoring needs exactly one."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise CaftError(
            f"The answer {text!r} is {len(ids)} tokens for this tokenizer; multiple-choice answers "
            "must be single tokens (e.g. ' A' / ' B')."
        )
    return ids[0]


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    return [tokenizer(prompt)["input_ids"] for prompt in prompts]


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad token ids so every sequence ends at the last position.

    Returns input_ids, attention_mask and position_ids (counting real tokens only), so a prompt
    gets the same positions whatever padding its batch needs.
    """
    if not sequences:
        raise CaftError("Cannot batch an empty list of sequences.")
    length = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, length - len(ids) :] = torch.as_tensor(ids)
            attention_mask[row, length - len(ids) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


def batches(items: Sequence, batch_size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def last_position_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [batch, vocab] at the last position, computing the LM head there only when supported."""
    return last_logits(model, batch, 1)[:, -1, :]


def last_logits(model, batch: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
    """Logits [batch, keep, vocab] of the last `keep` positions, the LM head run there only when
    the model supports it (the vocabulary projection is most of a small model's forward)."""
    try:
        outputs = model(**batch, logits_to_keep=keep)
    except TypeError:  # models without logits_to_keep
        outputs = model(**batch)
    return outputs.logits[:, -keep:, :]


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def model_device(model) -> torch.device:
    return next(model.parameters()).device
