"""The double multiple-choice task: two binary questions in one prompt, only one of them intended.

A prompt joins a question from each of two sub-datasets and offers two options, each naming one
answer per question:

    Question: {question_a} | {question_b}
    A. {x1}, {x2}
    B. {y1}, {y2}
    Answer:

Training (and validation) items are *ambiguous*: both questions' correct answers sit in the same
option, so a model can answer from either question. Test items are *unambiguous*: the two correct
answers sit in different options, and only the intended question's answer counts. CAFT ablates the
concept of the other (unintended) question during training, so the model has to learn the intended
one. In half of each split the option lists are swapped, so both letters are right equally often.

Sub-datasets are rows `question, correct, incorrect` (the paper's published format). caft writes
its own, offline and deterministic given a seed, from material in `data/double_mc/`:

- verbs: subject-verb agreement with a distractor noun of the other number
  ("The kids near the bike _ happy today." -> are / is); is/are, has/have, does/do, goes/go;
- sentiment: "What is the sentiment of the following sentence? <review>" -> positive / negative;
- sports: "<athlete> is known for playing" -> football / basketball / baseball (the incorrect answer
  is another of the three). This domain holds only the athletes listed (about 200), fewer than the
  1,000 distinct questions the other sub-datasets reach, and so caps a pair that uses it;
- pronouns: an occupation sentence with a blank in a subject slot (he / she / they) or an object
  slot (him / her / them); the incorrect answer is the other case of the same pronoun.

A setting names the two sub-datasets in prompt order, the intended one in capitals:
`verbs|SENTIMENT` puts a verbs question first and a sentiment question second, and sentiment is
intended, so the verbs concept is the one ablated. `SETTINGS` lists the paper's 16.
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from caft.errors import CaftError
from caft.tasks.base import MCExample, MCSplits

PROMPT_FORMAT = (
    "Question: {question_a} | {question_b}\nA. {option_a1}, {option_a2}\n"
    "B. {option_b1}, {option_b2}\nAnswer:"
)
SUBTASKS = ("verbs", "sentiment", "sports", "pronouns")
COLUMNS = ("question", "correct", "incorrect")
SENTIMENT_QUESTION = "What is the sentiment of the following sentence? {sentence}"
SPORTS_QUESTION = "{athlete} is known for playing"
SPORTS = ("football", "basketball", "baseball")
BLANK = "_"
# The paper's 16 settings: 8 (first, second) pairs in prompt order x which one is intended (CAPS).
SETTINGS = (
    "verbs|SENTIMENT",
    "SENTIMENT|verbs",
    "SPORTS|pronouns",
    "pronouns|SPORTS",
    "PRONOUNS|sports",
    "sports|PRONOUNS",
    "sentiment|VERBS",
    "VERBS|sentiment",
    "SENTIMENT|sports",
    "sports|SENTIMENT",
    "VERBS|sports",
    "sports|VERBS",
    "SENTIMENT|pronouns",
    "pronouns|SENTIMENT",
    "VERBS|pronouns",
    "pronouns|VERBS",
)


class QARow(NamedTuple):
    """One binary question of a sub-dataset: `correct` is its right answer, `incorrect` the other."""

    question: str
    correct: str
    incorrect: str


@dataclass(frozen=True)
class Setting:
    """Which sub-datasets a double-MC prompt joins, in prompt order, and which one is intended."""

    name: str
    first: str
    second: str
    intended_position: str  # "a" (the first question) or "b" (the second)

    @property
    def intended(self) -> str:
        return self.first if self.intended_position == "a" else self.second

    @property
    def ablated(self) -> str:
        """The unintended sub-task: its concept is the one CAFT ablates."""
        return self.second if self.intended_position == "a" else self.first


def parse_setting(name: str | Setting) -> Setting:
    """`"verbs|SENTIMENT"` -> first verbs, second sentiment, sentiment intended (the capitals).

    Any two different sub-tasks combine this way; `SETTINGS` lists the paper's 16.
    """
    if isinstance(name, Setting):
        return name
    hint = f"Write 'first|second' with the intended one in capitals, e.g. one of: {', '.join(SETTINGS)}."
    parts = [part.strip() for part in str(name).split("|")]
    if len(parts) != 2 or not all(parts):
        raise CaftError(f"Setting {name!r}: expected two sub-task names joined by '|'. {hint}")
    lowered = [part.lower() for part in parts]
    for part in lowered:
        if part not in SUBTASKS:
            raise CaftError(
                f"Setting {name!r}: unknown sub-task {part!r}; use {', '.join(SUBTASKS)}. {hint}"
            )
    if lowered[0] == lowered[1]:
        raise CaftError(f"Setting {name!r}: the two questions must come from different sub-tasks.")
    capitals = [part == part.upper() for part in parts]
    if any(not cap and part != part.lower() for part, cap in zip(parts, capitals, strict=True)):
        raise CaftError(f"Setting {name!r}: write each sub-task all lower case or all capitals.")
    if sum(capitals) != 1:
        raise CaftError(
            f"Setting {name!r}: exactly one sub-task must be in capitals (the intended one). {hint}"
        )
    position = "a" if capitals[0] else "b"
    canonical = "|".join(
        part.upper() if cap else part for part, cap in zip(lowered, capitals, strict=True)
    )
    return Setting(name=canonical, first=lowered[0], second=lowered[1], intended_position=position)


# ----------------------------------------------------------------------------------------------
# Sub-datasets written by caft


def material_path(subtask: str) -> Path:
    """The JSON file caft's generator for `subtask` builds its questions from."""
    return Path(str(resources.files("caft.tasks") / "data" / "double_mc" / f"{subtask}.json"))


def _material(subtask: str) -> dict:
    path = material_path(subtask)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CaftError(f"Cannot read caft's {subtask} material from {path}: {error}") from error


def _check_count(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise CaftError(f"The number of rows must be a positive integer, got {n!r}.")


def _take_balanced(groups: Sequence[list[QARow]], n: int, rng: random.Random) -> list[QARow]:
    """Up to `n` rows with distinct questions, taken from the shuffled groups in turn, then shuffled.

    Taking in turn keeps the groups (e.g. singular/plural x verb) as equal in size as the data
    allows; which rows are taken depends on the seed.
    """
    queues = []
    for group in groups:
        queue = list(group)
        rng.shuffle(queue)
        queues.append(queue)
    chosen = _take_in_turn(queues, n)
    rng.shuffle(chosen)
    return chosen


def _take_in_turn(queues: Sequence[list[QARow]], n: int) -> list[QARow]:
    """Up to `n` rows, one from each queue in turn (in queue order), skipping repeated questions."""
    chosen: list[QARow] = []
    seen: set[str] = set()
    cursor = 0
    while len(chosen) < n and any(cursor < len(queue) for queue in queues):
        for queue in queues:
            if cursor < len(queue) and len(chosen) < n and queue[cursor].question not in seen:
                seen.add(queue[cursor].question)
                chosen.append(queue[cursor])
        cursor += 1
    return chosen


def make_verbs(n: int = 2000, seed: int = 0) -> list[QARow]:
    """Subject-verb agreement: "The kids near the bike _ happy today." -> are (incorrect: is).

    The distractor noun always has the other number than the subject. Rows are balanced over
    singular/plural subjects and the four verb pairs (is/are, has/have, does/do, goes/go).
    """
    _check_count(n)
    material = _material("verbs")
    groups = []
    for verb in material["verbs"]:
        for number, other in (("singular", "plural"), ("plural", "singular")):
            index, other_index = (0, 1) if number == "singular" else (1, 0)
            groups.append(
                [
                    QARow(
                        f"The {subject[index]} {phrase} {(sg, pl)[other_index]} {BLANK} {predicate}.",
                        verb[number],
                        verb[other],
                    )
                    for subject in material["subjects"]
                    for phrase, sg, pl in material["distractors"]
                    for predicate in verb["predicates"]
                ]
            )
    return _take_balanced(groups, n, random.Random(seed))


def make_sentiment(n: int = 2000, seed: int = 0) -> list[QARow]:
    """Review-like sentences -> positive / negative, half of each (to within one row)."""
    _check_count(n)
    material = _material("sentiment")
    groups = [
        [
            QARow(
                SENTIMENT_QUESTION.format(sentence=f"{subject} {clause}."),
                polarity,
                "negative" if polarity == "positive" else "positive",
            )
            for subject in material["subjects"]
            for clause in material[polarity]
        ]
        for polarity in ("positive", "negative")
    ]
    return _take_balanced(groups, n, random.Random(seed))


def make_sports(n: int = 2000, seed: int = 0) -> list[QARow]:
    """ "<athlete> is known for playing" -> the athlete's sport; incorrect: one of the other two.

    One question per athlete, so this returns at most as many rows as caft lists athletes (about
    200): fewer than `n` when `n` is larger. Sports alternate, so they stay balanced.
    """
    _check_count(n)
    material = _material("sports")
    rng = random.Random(seed)
    groups = [
        [
            QARow(
                SPORTS_QUESTION.format(athlete=athlete),
                sport,
                rng.choice([other for other in SPORTS if other != sport]),
            )
            for athlete in material[sport]
        ]
        for sport in SPORTS
    ]
    return _take_balanced(groups, n, rng)


def make_pronouns(n: int = 2000, seed: int = 0) -> list[QARow]:
    """Occupation sentences with a blank -> he/she/they (subject slot) or him/her/them (object).

    The incorrect answer is the same pronoun in the other case. Half the rows have each case, and
    within a case the three pronouns take turns.
    """
    _check_count(n)
    material = _material("pronouns")
    rng = random.Random(seed)
    pronouns = material["pronouns"]
    groups = []
    for case, other_case in (("nominative", "object"), ("object", "nominative")):
        sentences = [
            _capitalize(template.format(occupation=occupation))
            for template in material[case]
            for occupation in material["occupations"]
        ]
        rng.shuffle(sentences)
        groups.append(
            [
                QARow(
                    sentence,
                    pronouns[case][i % len(pronouns[case])],
                    pronouns[other_case][i % len(pronouns[case])],
                )
                for i, sentence in enumerate(sentences)
            ]
        )
    # The sentences are shuffled already; taking rows in order keeps the pronouns' rotation.
    chosen = _take_in_turn(groups, n)
    rng.shuffle(chosen)
    return chosen


def _capitalize(text: str) -> str:
    return text[0].upper() + text[1:] if text else text


GENERATORS: dict[str, Callable[[int, int], list[QARow]]] = {
    "verbs": make_verbs,
    "sentiment": make_sentiment,
    "sports": make_sports,
    "pronouns": make_pronouns,
}


def make_rows(subtask: str, n: int = 2000, seed: int = 0) -> list[QARow]:
    """caft's own rows for a sub-task by name (see `SUBTASKS`)."""
    if subtask not in GENERATORS:
        raise CaftError(f"Unknown sub-task {subtask!r}; use {', '.join(SUBTASKS)}.")
    return GENERATORS[subtask](n, seed)


# ----------------------------------------------------------------------------------------------
# Sub-datasets in the paper's published format


def load_rows(path: str | Path) -> list[QARow]:
    """Rows from a `.csv` (header with question,correct,incorrect) or `.jsonl` (one object a line).

    Other columns are ignored and fields are stripped of surrounding whitespace. Repeated
    questions are kept here; `make_double_mc` drops them, as the paper does.
    """
    path = Path(path)
    if not path.is_file():
        raise CaftError(f"Rows file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise CaftError(
            f"{path}: unknown format {suffix or '(no extension)'!r}; use a .csv or .jsonl file with "
            f"columns {','.join(COLUMNS)}."
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise CaftError(f"Cannot read {path}: {error}") from error
    if not text.strip():
        raise CaftError(f"{path}: the file is empty; expected rows with {','.join(COLUMNS)}.")
    rows = _read_csv(path, text) if suffix == ".csv" else _read_jsonl(path, text)
    if not rows:
        raise CaftError(f"{path}: no rows (the file has a header but nothing under it).")
    return rows


def _read_csv(path: Path, text: str) -> list[QARow]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    header = [name.strip() for name in reader.fieldnames or []]
    reader.fieldnames = header
    missing = [column for column in COLUMNS if column not in header]
    if missing:
        raise CaftError(
            f"{path} line 1: missing column {', '.join(repr(m) for m in missing)}; the header must "
            f"have {','.join(COLUMNS)} (found {','.join(header) or 'nothing'})."
        )
    return [_check_row(record, f"{path} line {reader.line_num}") for record in reader]


def _read_jsonl(path: Path, text: str) -> list[QARow]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise CaftError(
                f"{where}: not valid JSON ({error.msg}, column {error.colno})."
            ) from error
        if not isinstance(record, dict):
            raise CaftError(
                f"{where}: expected a JSON object with keys {', '.join(COLUMNS)}, "
                f"got {type(record).__name__}."
            )
        missing = [column for column in COLUMNS if column not in record]
        if missing:
            raise CaftError(
                f"{where}: missing key {', '.join(repr(m) for m in missing)}; each line needs "
                f"{', '.join(COLUMNS)}."
            )
        rows.append(_check_row(record, where))
    return rows


def _check_row(record: dict, where: str) -> QARow:
    values = {}
    for column in COLUMNS:
        value = record.get(column)
        value = "" if value is None else str(value).strip()
        if not value:
            raise CaftError(f"{where}: empty {column!r}.")
        values[column] = value
    if values["correct"] == values["incorrect"]:
        raise CaftError(
            f"{where}: 'correct' and 'incorrect' are both {values['correct']!r}; they must differ."
        )
    return QARow(**values)


# ----------------------------------------------------------------------------------------------
# Pairing


def make_double_mc(
    setting: str | Setting,
    rows_a: Iterable[QARow] | None = None,
    rows_b: Iterable[QARow] | None = None,
    *,
    n_max: int = 2000,
    train_fraction: float = 0.7,
    seed: int = 0,
) -> MCSplits:
    """Train / val / test double-MC prompts for a setting such as `"verbs|SENTIMENT"`.

    rows_a, rows_b: the first and second sub-dataset (prompt order), e.g. from `load_rows`; None
        generates caft's own with `seed`. Questions that occur more than once (within or across the
        two) are dropped entirely; each is shuffled with `seed` and row i of one is paired with row
        i of the other, at most `n_max` pairs.
    The first `train_fraction` of the pairs are for training, the rest is halved into val and test,
    so no question is in two splits. Train and val are ambiguous, test is unambiguous (the OOD
    set); the option lists are swapped in half of each split. Each example's `correct` letter is
    the intended question's answer; `info` records both questions, the options, each question's
    letter (`answer_a`, `answer_b`) and which sub-task is intended and which ablated.
    """
    setting = parse_setting(setting)
    if not isinstance(n_max, int) or n_max < 4:
        raise CaftError(
            f"n_max must be an integer of at least 4 (one pair per split), got {n_max!r}."
        )
    if not 0 < train_fraction < 1:
        raise CaftError(f"train_fraction must be in (0, 1), got {train_fraction}.")
    given = {"a": rows_a is not None, "b": rows_b is not None}
    rows_a = (
        _as_rows(rows_a, "rows_a") if rows_a is not None else make_rows(setting.first, n_max, seed)
    )
    rows_b = (
        _as_rows(rows_b, "rows_b") if rows_b is not None else make_rows(setting.second, n_max, seed)
    )
    counts = Counter(row.question for row in [*rows_a, *rows_b])
    unique_a = [row for row in rows_a if counts[row.question] == 1]
    unique_b = [row for row in rows_b if counts[row.question] == 1]
    rng = random.Random(seed)
    rng.shuffle(unique_a)
    rng.shuffle(unique_b)
    n_pairs = min(len(unique_a), len(unique_b), n_max)
    n_train = int(n_pairs * train_fraction)
    n_val = (n_pairs - n_train) // 2
    bounds = {
        "train": (0, n_train),
        "val": (n_train, n_train + n_val),
        "test": (n_train + n_val, n_pairs),
    }
    if any(end - start < 1 for start, end in bounds.values()):
        raise CaftError(
            f"Setting {setting.name}: only {n_pairs} pairs of distinct questions "
            f"({len(unique_a)} {setting.first}, {len(unique_b)} {setting.second} after dropping "
            "repeated questions); every split needs at least one. Give more rows."
        )
    splits = {
        split: _make_split(setting, unique_a[start:end], unique_b[start:end], split != "test", rng)
        for split, (start, end) in bounds.items()
    }
    description = {
        "task": "double-mc",
        "setting": setting.name,
        "first": setting.first,
        "second": setting.second,
        "intended": setting.intended,
        "ablated": setting.ablated,
        "seed": seed,
        "n_max": n_max,
        "n_pairs": n_pairs,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_pairs - n_train - n_val,
        "rows_a": "given" if given["a"] else "generated",
        "rows_b": "given" if given["b"] else "generated",
        "repeated_questions_dropped": {
            "a": len(rows_a) - len(unique_a),
            "b": len(rows_b) - len(unique_b),
        },
    }
    return MCSplits(
        train=splits["train"],
        eval_sets={"val": splits["val"], "test": splits["test"]},
        description=description,
    )


def _as_rows(rows: Iterable, label: str) -> list[QARow]:
    checked = []
    for index, row in enumerate(rows):
        if not isinstance(row, tuple) or len(row) != 3:
            raise CaftError(
                f"{label}[{index}]: expected a QARow(question, correct, incorrect), got {row!r}."
            )
        checked.append(QARow(*row))
    if not checked:
        raise CaftError(f"{label} is empty.")
    return checked


def _make_split(
    setting: Setting, rows_a: list[QARow], rows_b: list[QARow], ambiguous: bool, rng: random.Random
) -> list[MCExample]:
    swaps = [True] * (len(rows_a) // 2) + [False] * (len(rows_a) - len(rows_a) // 2)
    rng.shuffle(swaps)
    return [
        _make_example(setting, row_a, row_b, ambiguous=ambiguous, swapped=swapped)
        for row_a, row_b, swapped in zip(rows_a, rows_b, swaps, strict=True)
    ]


def _make_example(
    setting: Setting, row_a: QARow, row_b: QARow, *, ambiguous: bool, swapped: bool
) -> MCExample:
    """One prompt. Unswapped, option A holds a's correct answer; b's is with it only if ambiguous."""
    with_a_correct = [row_a.correct, row_b.correct if ambiguous else row_b.incorrect]
    with_a_incorrect = [row_a.incorrect, row_b.incorrect if ambiguous else row_b.correct]
    option_a, option_b = (
        (with_a_incorrect, with_a_correct) if swapped else (with_a_correct, with_a_incorrect)
    )
    answer_a = "B" if swapped else "A"
    answer_b = answer_a if ambiguous else _other_letter(answer_a)
    intended_letter = answer_a if setting.intended_position == "a" else answer_b
    prompt = PROMPT_FORMAT.format(
        question_a=row_a.question,
        question_b=row_b.question,
        option_a1=option_a[0],
        option_a2=option_a[1],
        option_b1=option_b[0],
        option_b2=option_b[1],
    )
    return MCExample(
        prompt=prompt,
        correct=f" {intended_letter}",
        incorrect=f" {_other_letter(intended_letter)}",
        category="ambiguous" if ambiguous else "unambiguous",
        info={
            "setting": setting.name,
            "question_a": row_a.question,
            "question_b": row_b.question,
            "options": {"A": option_a, "B": option_b},
            "answer_a": answer_a,
            "answer_b": answer_b,
            "intended": setting.intended,
            "ablated": setting.ablated,
            "intended_question": setting.intended_position,
            "ambiguous": ambiguous,
            "swapped": swapped,
        },
    )


def _other_letter(letter: str) -> str:
    return "B" if letter == "A" else "A"
