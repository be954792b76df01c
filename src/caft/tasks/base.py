"""What every multiple-choice task produces: prompts whose answer is one option letter."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice prompt. The model should continue `prompt` with `correct`, not `incorrect`.

    `correct`/`incorrect` are the continuations scored at the last position (" A" / " B").
    `category` groups results (e.g. "nominative"); `info` holds task-specific details.
    """

    prompt: str
    correct: str
    incorrect: str
    category: str = ""
    info: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass
class MCSplits:
    """Training data plus the evaluation sets a task defines (e.g. {"id": ..., "ood": ...})."""

    train: list[MCExample]
    eval_sets: dict[str, list[MCExample]]
    description: dict = field(default_factory=dict)
