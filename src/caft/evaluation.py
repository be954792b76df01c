"""Multiple-choice evaluation from option-letter logits, with ablation off (deployed) or on.

`evaluate_mc` scores one condition. `compare_hooks` scores hooks off and on in one pass and says
how much the trained model's answers depend on the hooks: a CAFT model should answer the same way
without them (small KL, few flips); a large change means it learned to rely on the ablation.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from caft.ablation import ablate
from caft.batching import (
    batches,
    encode_prompts,
    last_position_logits,
    model_device,
    pad_left,
    single_token_id,
    to_device,
)
from caft.concepts import ConceptSet
from caft.tasks.base import MCExample


@dataclass
class MCResult:
    """Accuracy of one model on one evaluation set, with per-example margins for later analysis."""

    accuracy: float
    n: int
    accuracy_by_category: dict[str, float] = field(default_factory=dict)
    margins: list[float] = field(default_factory=list, repr=False)  # logit(correct) - logit(other)

    def summary(self) -> dict:
        data = asdict(self)
        data.pop("margins")
        return data


@dataclass
class HookComparison:
    """Hooks off vs on for the same model and examples."""

    hooks_off: MCResult
    hooks_on: MCResult
    mean_kl: float  # mean KL(hooks on ‖ hooks off) of the next-token distribution at the answer
    answer_flip_rate: float  # fraction of examples whose chosen letter changes

    def summary(self) -> dict:
        return {
            "hooks_off": self.hooks_off.summary(),
            "hooks_on": self.hooks_on.summary(),
            "mean_kl_on_vs_off": self.mean_kl,
            "answer_flip_rate": self.answer_flip_rate,
        }


@torch.no_grad()
def answer_logits(
    model,
    tokenizer,
    examples: Sequence[MCExample],
    *,
    batch_size: int = 32,
    progress: bool = False,
    description: str = "scoring",
) -> torch.Tensor:
    """Log-probabilities [n, vocab] of the next token after each prompt (float32, CPU)."""
    device = model_device(model)
    token_lists = encode_prompts(tokenizer, [e.prompt for e in examples])
    outputs = []
    for chunk in tqdm(
        list(batches(token_lists, batch_size)), desc=description, disable=not progress, leave=False
    ):
        batch = to_device(pad_left(chunk, tokenizer.pad_token_id), device)
        outputs.append(torch.log_softmax(last_position_logits(model, batch).float(), -1).cpu())
    return torch.cat(outputs)


def result_from_logits(
    tokenizer, examples: Sequence[MCExample], log_probs: torch.Tensor
) -> MCResult:
    correct_ids = torch.tensor([single_token_id(tokenizer, e.correct) for e in examples])
    other_ids = torch.tensor([single_token_id(tokenizer, e.incorrect) for e in examples])
    rows = torch.arange(len(examples))
    margins = log_probs[rows, correct_ids] - log_probs[rows, other_ids]
    right = (margins > 0).float()
    by_category: dict[str, list[float]] = {}
    for example, is_right in zip(examples, right.tolist(), strict=True):
        by_category.setdefault(example.category or "all", []).append(is_right)
    return MCResult(
        accuracy=round(right.mean().item(), 4),
        n=len(examples),
        accuracy_by_category={k: round(sum(v) / len(v), 4) for k, v in sorted(by_category.items())},
        margins=[round(m, 4) for m in margins.tolist()],
    )


def evaluate_mc(
    model,
    tokenizer,
    examples: Sequence[MCExample],
    *,
    concepts: ConceptSet | None = None,
    prefix_tokens: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> MCResult:
    """Accuracy: the correct letter's logit beats the other's. With `concepts`, hooks are on."""
    context = (
        ablate(model, concepts, prefix_tokens=prefix_tokens)
        if concepts is not None
        else nullcontext()
    )
    with context:
        log_probs = answer_logits(
            model, tokenizer, examples, batch_size=batch_size, progress=progress
        )
    return result_from_logits(tokenizer, examples, log_probs)


def compare_hooks(
    model,
    tokenizer,
    examples: Sequence[MCExample],
    concepts: ConceptSet,
    *,
    prefix_tokens: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> HookComparison:
    """Evaluate with the hooks off and on, and measure how much the answers change."""
    off = answer_logits(model, tokenizer, examples, batch_size=batch_size, progress=progress)
    with ablate(model, concepts, prefix_tokens=prefix_tokens):
        on = answer_logits(model, tokenizer, examples, batch_size=batch_size, progress=progress)
    kl = (on.exp() * (on - off)).sum(-1).clamp_min(0)
    result_off = result_from_logits(tokenizer, examples, off)
    result_on = result_from_logits(tokenizer, examples, on)
    flips = [(a > 0) != (b > 0) for a, b in zip(result_off.margins, result_on.margins, strict=True)]
    return HookComparison(
        hooks_off=result_off,
        hooks_on=result_on,
        mean_kl=round(kl.mean().item(), 4),
        answer_flip_rate=round(sum(flips) / max(1, len(flips)), 4),
    )
