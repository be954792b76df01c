"""Autointerp: explain each candidate direction with an LLM, then score its relevance to the concept.

For each candidate, one chat: the explainer reads the candidate's top windows (and, for PCs, its
bottom ones) with the strongest tokens marked `<<like this>>` and writes a 1-2 sentence explanation;
then, in the same chat, it reads the user's description of the unwanted concept (a sentence, a few
example inputs of the unwanted task, pointers) and rates relevance 0-100. The score is the
probability-weighted mean over the answers that are numbers 0-100 (`score_kind="logprob"`), or None
when less than `min_number_mass` of the probability is on numbers; where the backend gives no
log-probabilities, a number parsed from a short reply (`score_kind="parsed"`).

Results are written to a JSON file after every candidate: a crash keeps the finished ones, and a
re-run (with the same prompts) only does the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from caft.autointerp.backends import ChatBackend, Message
from caft.concepts import parse_direction_id
from caft.displays import Window
from caft.errors import CaftError
from caft.io import read_json, write_json
from caft.selection import ConceptDescription

logger = logging.getLogger(__name__)

RESULTS_FORMAT = "caft.autointerp"
PC_MARK_FRACTION = 0.5  # PCs: tokens above half the side's maximum are marked
SAE_MARK_FRACTION = 0.2  # SAE latents: above a fifth

EXPLAINER_SYSTEM = (
    "You are an AI researcher interpreting the internals of a language model. A feature is a "
    "direction in the model's activations; you see the text where it is most active and say, "
    "briefly and specifically, what it responds to."
)


@dataclass
class Interpretation:
    """One candidate's explanation and relevance score (a row of the selection file)."""

    id: str
    layer: int
    candidate_index: int
    explanation: str
    score: float | None  # relevance 0-100, or None
    score_kind: str | None  # "logprob", "parsed", or None (no usable score)
    number_mass: float | None = None  # probability on number answers (logprob scores only)
    selected: bool = False
    prompt_hash: str = ""  # of the prompts, model and settings: a re-run reuses only a match


def mark_window(window: Window, threshold: float, *, sign: float = 1.0) -> str:
    """The window's text with runs of tokens whose `sign * value >= threshold` wrapped in <<…>>."""
    pieces: list[str] = []
    run: list[str] = []

    def close_run() -> None:
        if run:
            text = "".join(run)
            stripped = text.lstrip()
            pieces.append(f"{text[: len(text) - len(stripped)]}<<{stripped}>>")
            run.clear()

    for token, value in zip(window.tokens, window.values, strict=True):
        if threshold > 0 and sign * value >= threshold:
            run.append(token)
        else:
            close_run()
            pieces.append(token)
    close_run()
    return " ".join("".join(pieces).split())  # newlines and runs of spaces as one space


def explainer_prompt(
    windows: Mapping[str, Sequence[Window]],
    *,
    mark_fraction: float,
    sides: Sequence[str] = ("top", "bottom"),
    n_examples: int = 20,
) -> str:
    """The explainer's request: the examples of each side, strongest tokens marked."""
    labels = {
        "top": "Texts where the feature is most strongly positive",
        "bottom": "Texts where it is most strongly negative (the opposite end of the same feature)",
    }
    parts = []
    for side in sides:
        items = list(windows.get(side, []))[:n_examples]
        if not items:
            continue
        sign = 1.0 if side == "top" else -1.0
        peak = max(sign * value for item in items for value in item.values)
        threshold = mark_fraction * peak
        lines = [
            f"{i}. {mark_window(item, threshold, sign=sign)}" for i, item in enumerate(items, 1)
        ]
        parts.append(f"{labels[side]}:\n" + "\n".join(lines))
    if not parts:
        raise CaftError("No example windows to explain: was the corpus empty?")
    ends = " (for both ends, if they differ)" if len(parts) > 1 else ""
    return (
        "In each text below, the tokens where the feature is strongest are marked <<like this>>.\n\n"
        + "\n\n".join(parts)
        + f"\n\nIn one or two sentences, say what this feature responds to{ends}. Be specific: name "
        "the words, topics or grammatical roles involved. Reply with the explanation only."
    )


def relevance_prompt(description: ConceptDescription, *, n_task_examples: int = 5) -> str:
    """The relevance question, asked in the same chat after the explanation."""
    concept = f"{description.concept}: " if description.concept else ""
    parts = [
        "Now consider a concept we want to remove from the model.",
        f"Concept: {concept}{description.description}",
    ]
    if description.examples:
        examples = "\n".join(
            f'- "{" ".join(example.split())}"' for example in description.examples[:n_task_examples]
        )
        parts.append(f"Example inputs of the task where the concept shows up:\n{examples}")
    if description.pointers:
        parts.append("Pointers:\n" + "\n".join(f"- {pointer}" for pointer in description.pointers))
    parts.append(
        "How relevant is the feature you just explained to this concept? Answer with a single "
        "integer from 0 (unrelated) to 100 (it clearly is this concept), and nothing else."
    )
    return "\n\n".join(parts)


_NUMBER = re.compile(r"[0-9]+")


def score_from_logprobs(
    top_logprobs: Mapping[str, float], *, min_number_mass: float = 0.25
) -> tuple[float | None, float]:
    """(probability-weighted mean over the answers that are integers 0-100, their total
    probability); the mean is None when that probability is below `min_number_mass`."""
    weights: dict[int, float] = {}
    for token, logprob in top_logprobs.items():
        text = token.strip()
        if _NUMBER.fullmatch(text) and int(text) <= 100:
            weights[int(text)] = weights.get(int(text), 0.0) + math.exp(logprob)
    mass = sum(weights.values())
    if mass < min_number_mass or mass <= 0:
        return None, mass
    return sum(value * p for value, p in weights.items()) / mass, mass


def parse_score(text: str) -> float | None:
    """The first integer in a reply, if it is 0-100."""
    match = re.search(r"(?<![0-9.])([0-9]{1,3})(?![0-9])", text)
    if match and int(match.group(1)) <= 100:
        return float(match.group(1))
    return None


def explain_and_score(
    windows: Mapping[str, Mapping[str, Sequence[Window]]],
    description: ConceptDescription,
    backend: ChatBackend,
    *,
    mark_fraction: float = PC_MARK_FRACTION,
    sides: Sequence[str] = ("top", "bottom"),
    n_examples: int = 20,
    n_task_examples: int = 5,
    explanation_tokens: int = 120,
    top_logprobs: int = 20,
    min_number_mass: float = 0.25,
    results_path: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Interpretation]:
    """Explain and score every candidate in `windows` ({id: {"top": [...], "bottom": [...]}}, as
    from `caft.displays.collect_windows`), `backend.concurrency` candidates at a time.

    With `results_path`, results are saved after every candidate and those already there (for the
    same prompts, backend, model and settings) are reused. A failure keeps the finished ones and says so.
    """
    runner = _Runner(
        backend, description, mark_fraction, sides, n_examples, n_task_examples,
        explanation_tokens, top_logprobs, min_number_mass,
    )  # fmt: skip
    prompts = {
        cid: runner.explainer_messages(sides_windows) for cid, sides_windows in windows.items()
    }
    settings = {
        "backend": backend.kind, "model": backend.model, "relevance": runner.relevance,
        "explanation_tokens": explanation_tokens, "top_logprobs": top_logprobs,
        "min_number_mass": min_number_mass,
    }  # fmt: skip
    hashes = {cid: _hash({"explainer": messages} | settings) for cid, messages in prompts.items()}
    results = _load_results(results_path, hashes)
    todo = [cid for cid in windows if cid not in results]
    if len(todo) < len(windows):
        logger.info(
            "autointerp: %d of %d candidates already done.", len(windows) - len(todo), len(windows)
        )

    def record(result: Interpretation) -> None:
        results[result.id] = result
        if results_path is not None:
            _save_results(results_path, results, windows, backend)

    def work(cid: str) -> Interpretation:
        return runner.interpret(cid, prompts[cid], hashes[cid])

    bar = tqdm(total=len(todo), desc="autointerp", disable=not progress)
    try:
        if backend.concurrency <= 1:
            for cid in todo:
                record(work(cid))
                bar.update()
        else:
            _run_parallel(todo, work, record, bar, backend.concurrency)
    except CaftError as error:
        where = f" in {results_path}" if results_path is not None else ""
        raise CaftError(
            f"{error}\nAutointerp stopped: {len(results)} of {len(windows)} candidates are done"
            f"{where}; re-run to do the rest (cached answers cost nothing)."
        ) from error
    finally:
        bar.close()
    if results_path is not None:
        _save_results(results_path, results, windows, backend)
    return {cid: results[cid] for cid in windows}


def _run_parallel(todo, work, record, bar, concurrency: int) -> None:
    pool = ThreadPoolExecutor(max_workers=concurrency)
    futures = [pool.submit(work, cid) for cid in todo]
    try:
        for future in as_completed(futures):
            record(future.result())
            bar.update()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # let the running ones finish, keep them
        for future in futures:
            if future.done() and not future.cancelled() and future.exception() is None:
                record(future.result())
        raise
    finally:
        pool.shutdown(wait=True)


class _Runner:
    def __init__(
        self, backend, description, mark_fraction, sides, n_examples, n_task_examples,
        explanation_tokens, top_logprobs, min_number_mass,
    ):  # fmt: skip
        self.backend = backend
        self.description = description
        self.mark_fraction = mark_fraction
        self.sides = tuple(sides)
        self.n_examples = n_examples
        self.relevance = relevance_prompt(description, n_task_examples=n_task_examples)
        self.explanation_tokens = explanation_tokens
        self.top_logprobs = top_logprobs
        self.min_number_mass = min_number_mass
        self.no_logprobs = False  # set once the backend answers a score request without them

    def explainer_messages(self, sides_windows) -> list[Message]:
        prompt = explainer_prompt(
            sides_windows,
            mark_fraction=self.mark_fraction,
            sides=self.sides,
            n_examples=self.n_examples,
        )
        return [
            {"role": "system", "content": EXPLAINER_SYSTEM},
            {"role": "user", "content": prompt},
        ]

    def interpret(self, cid: str, messages: list[Message], prompt_hash: str) -> Interpretation:
        explained = self.backend.complete(messages, max_tokens=self.explanation_tokens)
        explanation = explained.text.strip()
        chat = [
            *messages,
            {"role": "assistant", "content": explanation},
            {"role": "user", "content": self.relevance},
        ]
        score, kind, mass = None, None, None
        if not self.no_logprobs:
            answer = self.backend.complete(chat, max_tokens=1, top_logprobs=self.top_logprobs)
            if answer.top_logprobs:
                score, mass = score_from_logprobs(
                    answer.top_logprobs[0], min_number_mass=self.min_number_mass
                )
                kind = "logprob" if score is not None else None
            else:
                self.no_logprobs = True
        if self.no_logprobs:
            score = parse_score(self.backend.complete(chat, max_tokens=8).text)
            kind = "parsed" if score is not None else None
        layer, index = parse_direction_id(cid)
        return Interpretation(
            id=cid,
            layer=layer,
            candidate_index=index,
            explanation=explanation,
            score=None if score is None else round(score, 3),
            score_kind=kind,
            number_mass=None if mass is None else round(mass, 4),
            prompt_hash=prompt_hash,
        )


def _hash(request: dict) -> str:
    text = json.dumps(request, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _load_results(path, hashes: Mapping[str, str]) -> dict[str, Interpretation]:
    if path is None or not Path(path).is_file():
        return {}
    try:
        data = read_json(path)
        rows = data["results"] if data.get("format") == RESULTS_FORMAT else []
        found = {row["id"]: Interpretation(**row) for row in rows}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        logger.warning("Ignoring unreadable autointerp results %s (%s).", path, error)
        return {}
    return {cid: r for cid, r in found.items() if hashes.get(cid) == r.prompt_hash}


def _save_results(path, results, windows, backend) -> None:
    usage = backend.usage
    write_json(
        path,
        {
            "format": RESULTS_FORMAT,
            "backend": backend.kind,
            "model": backend.model,
            "done": len(results),
            "total": len(windows),
            "usage": asdict(usage) | {"cache_hits": getattr(backend, "hits", 0)},
            "results": [asdict(results[cid]) for cid in windows if cid in results],
        },
    )


def _score_of(value) -> float | None:
    return value.score if isinstance(value, Interpretation) else value


def select_by_threshold(
    scores: Mapping[str, Interpretation | float | None], threshold: float = 70.0
) -> list[str]:
    """Ids scoring at least `threshold`, best first (no score never passes)."""
    scored = [(cid, _score_of(v)) for cid, v in scores.items() if _score_of(v) is not None]
    return [cid for cid, score in sorted(scored, key=lambda item: -item[1]) if score >= threshold]


def select_top_k(scores: Mapping[str, Interpretation | float | None], k: int) -> list[str]:
    """The `k` best-scoring ids (those without a score are never chosen)."""
    if k < 1:
        raise CaftError(f"top-k must be at least 1, got {k}.")
    scored = [(cid, _score_of(v)) for cid, v in scores.items() if _score_of(v) is not None]
    return [cid for cid, _ in sorted(scored, key=lambda item: -item[1])[:k]]


def mark_selected(results: Mapping[str, Interpretation], chosen: Sequence[str]) -> None:
    for cid, result in results.items():
        result.selected = cid in chosen
