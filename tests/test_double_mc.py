"""The double multiple-choice task: caft's four sub-datasets, loading the paper's format, pairing.

Splits are checked against the task's definition, not the code's own bookkeeping: each prompt is
parsed back into its two questions and two options, and the options are compared with the rows the
questions came from. Train/val must put both correct answers in one option, test must separate
them, and the correct letter must point at the intended question's answer.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter

import pytest

from caft.errors import CaftError
from caft.evaluation import evaluate_mc
from caft.tasks.double_mc import (
    SETTINGS,
    QARow,
    load_rows,
    make_double_mc,
    make_pronouns,
    make_rows,
    make_sentiment,
    make_sports,
    make_verbs,
    material_path,
    parse_setting,
)

GENERATORS = [make_verbs, make_sentiment, make_sports, make_pronouns]
PROMPT = re.compile(
    r"\AQuestion: (?P<qa>[^\n]+) \| (?P<qb>[^\n]+)\n"
    r"A\. (?P<a1>[^,\n]+), (?P<a2>[^,\n]+)\n"
    r"B\. (?P<b1>[^,\n]+), (?P<b2>[^,\n]+)\nAnswer:\Z"
)
SINGULAR_VERBS = {"is", "has", "does", "goes"}
VERB_PAIRS = {"is": "are", "has": "have", "does": "do", "goes": "go"}
PRONOUN_CASES = {"he": "him", "she": "her", "they": "them"}
SPORTS = {"football", "basketball", "baseball"}


def parse_prompt(prompt: str) -> dict[str, str]:
    match = PROMPT.match(prompt)
    assert match, f"prompt does not follow the paper's format:\n{prompt}"
    return match.groupdict()


def build(setting: str, n_max: int = 200, seed: int = 0):
    """Splits from generated rows, with the rows by question for checking the prompts."""
    parsed = parse_setting(setting)
    rows_a = make_rows(parsed.first, n_max, seed)
    rows_b = make_rows(parsed.second, n_max, seed)
    splits = make_double_mc(setting, rows_a, rows_b, n_max=n_max, seed=seed)
    return splits, {row.question: row for row in [*rows_a, *rows_b]}


def all_examples(splits):
    return {"train": splits.train, **splits.eval_sets}


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- sub-datasets


@pytest.mark.parametrize("generate", GENERATORS, ids=lambda f: f.__name__)
def test_generators_are_deterministic_given_a_seed(generate):
    assert generate(300, seed=1) == generate(300, seed=1)
    assert generate(300, seed=1) != generate(300, seed=2)


@pytest.mark.parametrize("generate", [make_verbs, make_sentiment, make_pronouns])
def test_generators_reach_1000_distinct_questions(generate):
    rows = generate(1200, seed=0)
    assert len(rows) == 1200
    assert len({row.question for row in rows}) == 1200


@pytest.mark.parametrize("generate", GENERATORS, ids=lambda f: f.__name__)
def test_every_row_is_a_binary_question_with_two_different_answers(generate):
    for row in generate(500, seed=3):
        assert row.question.strip() == row.question and row.question
        assert row.correct and row.incorrect and row.correct != row.incorrect


def test_verbs_answers_agree_with_the_subject_not_the_distractor():
    material = json.loads(material_path("verbs").read_text())
    number_of_subject = {pair[i]: i for pair in material["subjects"] for i in (0, 1)}
    number_of_distractor = {entry[1 + i]: i for entry in material["distractors"] for i in (0, 1)}
    for row in make_verbs(400, seed=0):
        before_blank, _ = row.question.split(" _ ")
        words = before_blank.split()
        assert words[0] == "The"
        subject_is_plural = number_of_subject[words[1]]
        distractor = next(d for d in number_of_distractor if before_blank.endswith(f" {d}"))
        assert number_of_distractor[distractor] != subject_is_plural, row
        assert (row.correct in SINGULAR_VERBS) == (not subject_is_plural), row
        singular = row.correct if row.correct in SINGULAR_VERBS else row.incorrect
        plural = row.incorrect if singular == row.correct else row.correct
        assert VERB_PAIRS[singular] == plural, row


def test_verbs_are_balanced_over_number_and_verb_pairs():
    rows = make_verbs(800, seed=0)
    singular = sum(row.correct in SINGULAR_VERBS for row in rows)
    assert singular == 400
    per_pair = Counter(row.correct if row.correct in VERB_PAIRS else row.incorrect for row in rows)
    assert set(per_pair) == set(VERB_PAIRS)
    assert min(per_pair.values()) == max(per_pair.values()) == 200


def test_sentiment_is_half_positive_and_labels_follow_the_clause():
    material = json.loads(material_path("sentiment").read_text())
    polarity_of = {clause: p for p in ("positive", "negative") for clause in material[p]}
    rows = make_sentiment(600, seed=0)
    assert Counter(row.correct for row in rows) == {"positive": 300, "negative": 300}
    prefix = "What is the sentiment of the following sentence? "
    for row in rows:
        assert row.question.startswith(prefix) and row.question.endswith(".")
        clause = next(c for c in polarity_of if row.question.endswith(f" {c}."))
        assert row.correct == polarity_of[clause]
        assert {row.correct, row.incorrect} == {"positive", "negative"}


def test_sports_rows_are_distinct_athletes_with_a_wrong_sport_as_distractor():
    rows = make_sports(5000, seed=0)
    assert 150 <= len(rows) < 5000  # the domain is capped by the athletes listed
    assert len({row.question for row in rows}) == len(rows)
    for row in rows:
        assert row.question.endswith(" is known for playing")
        assert row.correct in SPORTS and row.incorrect in SPORTS - {row.correct}
    counts = Counter(row.correct for row in rows)
    assert set(counts) == SPORTS and max(counts.values()) - min(counts.values()) <= 5


def test_pronouns_cover_both_cases_with_the_same_pronoun_in_the_other_case():
    rows = make_pronouns(600, seed=0)
    object_of = PRONOUN_CASES
    nominative_of = {obj: nom for nom, obj in PRONOUN_CASES.items()}
    cases = Counter("nominative" if row.correct in object_of else "object" for row in rows)
    assert cases == {"nominative": 300, "object": 300}
    assert {row.correct for row in rows} == set(object_of) | set(nominative_of)
    for row in rows:
        assert row.question.count("_") == 1, row
        expected = object_of.get(row.correct) or nominative_of[row.correct]
        assert row.incorrect == expected, row


def test_generators_reject_a_non_positive_count_and_unknown_subtasks():
    with pytest.raises(CaftError, match="positive integer"):
        make_verbs(0)
    with pytest.raises(CaftError, match="Unknown sub-task 'cooking'"):
        make_rows("cooking", 10)


# ---------------------------------------------------------------------------- published format


def test_load_rows_reads_csv_and_jsonl_alike(tmp_path):
    csv_path = write(
        tmp_path,
        "verbs.csv",
        "question,correct,incorrect,source\n"
        "The kids near the bike,are,is,x\n"
        '"Hello, world ", positive ,negative,y\n',
    )
    jsonl_path = write(
        tmp_path,
        "verbs.jsonl",
        '{"question": "The kids near the bike", "correct": "are", "incorrect": "is"}\n\n'
        '{"question": "Hello, world", "correct": "positive", "incorrect": "negative", "n": 1}\n',
    )
    expected = [
        QARow("The kids near the bike", "are", "is"),
        QARow("Hello, world", "positive", "negative"),
    ]
    assert load_rows(csv_path) == expected
    assert load_rows(jsonl_path) == expected


def test_generated_rows_round_trip_through_a_csv_file(tmp_path):
    rows = make_sentiment(50, seed=0)
    path = tmp_path / "sentiment.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "correct", "incorrect"])
        writer.writerows(rows)
    assert load_rows(path) == rows


MALFORMED = [
    ("a.csv", "question,correct\nq,a\n", ["a.csv line 1", "missing column 'incorrect'"]),
    (
        "a.jsonl",
        '{"question": "q", "correct": "a"}\n',
        ["a.jsonl line 1", "missing key 'incorrect'"],
    ),
    ("a.csv", "question,correct,incorrect\nq,a,b\nq2,,b\n", ["a.csv line 3", "empty 'correct'"]),
    ("a.csv", "question,correct,incorrect\n  ,a,b\n", ["a.csv line 2", "empty 'question'"]),
    (
        "a.jsonl",
        '{"question": "q", "correct": "a", "incorrect": "b"}\n'
        '{"question": "q2", "correct": "is", "incorrect": "is"}\n',
        ["a.jsonl line 2", "both 'is'", "must differ"],
    ),
    ("a.csv", "", ["a.csv", "empty"]),
    ("a.jsonl", "\n  \n", ["a.jsonl", "empty"]),
    ("a.csv", "question,correct,incorrect\n", ["a.csv", "no rows"]),
    (
        "a.jsonl",
        '{"question": "q", "correct": "a", "incorrect": "b"}\n{"question": "q2", \n',
        ["a.jsonl line 2", "not valid JSON"],
    ),
    ("a.jsonl", '["q", "a", "b"]\n', ["a.jsonl line 1", "expected a JSON object", "list"]),
    ("a.txt", "question,correct,incorrect\nq,a,b\n", ["a.txt", "unknown format '.txt'"]),
]


@pytest.mark.parametrize(("name", "text", "fragments"), MALFORMED)
def test_load_rows_names_the_file_line_and_problem(tmp_path, name, text, fragments):
    path = write(tmp_path, name, text)
    with pytest.raises(CaftError) as error:
        load_rows(path)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_load_rows_reports_a_missing_file(tmp_path):
    with pytest.raises(CaftError, match="not found"):
        load_rows(tmp_path / "absent.csv")


# ---------------------------------------------------------------------------- settings


def test_the_16_settings_parse_with_the_capitalized_one_intended():
    assert len(set(SETTINGS)) == 16
    for name in SETTINGS:
        setting = parse_setting(name)
        first, second = name.split("|")
        assert (setting.first, setting.second) == (first.lower(), second.lower())
        intended, ablated = (first, second) if first.isupper() else (second, first)
        assert setting.intended == intended.lower() and setting.ablated == ablated.lower()
        assert setting.name == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("verbs|sentiment", "exactly one sub-task must be in capitals"),
        ("VERBS|SENTIMENT", "exactly one sub-task must be in capitals"),
        ("verbs|COOKING", "unknown sub-task 'cooking'"),
        ("verbs", "two sub-task names joined by '|'"),
        ("verbs|VERBS", "different sub-tasks"),
        ("Verbs|sentiment", "all lower case or all capitals"),
    ],
)
def test_parse_setting_rejects_malformed_names(name, fragment):
    with pytest.raises(CaftError, match=re.escape(fragment)):
        parse_setting(name)


# ---------------------------------------------------------------------------- pairing


@pytest.mark.parametrize("setting", SETTINGS)
def test_every_setting_builds_70_15_15_splits_recording_intended_and_ablated(setting):
    splits = make_double_mc(setting, n_max=40, seed=0)
    sizes = {name: len(examples) for name, examples in all_examples(splits).items()}
    assert sizes == {"train": 28, "val": 6, "test": 6}
    parsed = parse_setting(setting)
    for examples in all_examples(splits).values():
        for example in examples:
            assert example.info["intended"] == parsed.intended
            assert example.info["ablated"] == parsed.ablated
            assert example.info["setting"] == setting
    assert splits.description["ablated"] == parsed.ablated


@pytest.mark.parametrize("setting", ["verbs|SENTIMENT", "PRONOUNS|sports", "SENTIMENT|pronouns"])
def test_train_and_val_are_ambiguous_and_test_is_not(setting):
    splits, rows = build(setting)
    for split, examples in all_examples(splits).items():
        for example in examples:
            parts = parse_prompt(example.prompt)
            row_a, row_b = rows[parts["qa"]], rows[parts["qb"]]
            option_a, option_b = (parts["a1"], parts["a2"]), (parts["b1"], parts["b2"])
            letter_a = "A" if option_a[0] == row_a.correct else "B"
            letter_b = "A" if option_a[1] == row_b.correct else "B"
            assert {option_a[0], option_b[0]} == {row_a.correct, row_a.incorrect}
            assert {option_a[1], option_b[1]} == {row_b.correct, row_b.incorrect}
            assert (letter_a == letter_b) == (split != "test")
            assert example.category == ("unambiguous" if split == "test" else "ambiguous")
            assert (example.info["answer_a"], example.info["answer_b"]) == (letter_a, letter_b)


@pytest.mark.parametrize("setting", ["verbs|SENTIMENT", "VERBS|sentiment", "sports|PRONOUNS"])
def test_the_correct_letter_is_the_intended_questions_answer(setting):
    splits, rows = build(setting)
    intended_first = parse_setting(setting).intended_position == "a"
    for example in splits.eval_sets["test"]:
        parts = parse_prompt(example.prompt)
        question = parts["qa"] if intended_first else parts["qb"]
        slot = 0 if intended_first else 1
        correct_answer = rows[question].correct
        letter = "A" if (parts["a1"], parts["a2"])[slot] == correct_answer else "B"
        assert example.correct == f" {letter}"
        assert example.incorrect == (" B" if letter == "A" else " A")


def test_letters_are_balanced_in_every_split():
    splits, _ = build("SENTIMENT|verbs", n_max=400)
    for examples in all_examples(splits).values():
        share_a = sum(example.correct == " A" for example in examples) / len(examples)
        assert abs(share_a - 0.5) <= 0.02
        swapped = sum(example.info["swapped"] for example in examples)
        assert swapped == len(examples) // 2


def test_prompt_follows_the_paper_format_exactly():
    rows_a = [QARow(f"The kid near the bikes {i} _ happy.", "is", "are") for i in range(20)]
    rows_b = [QARow(f"Athlete {i} is known for playing", "football", "baseball") for i in range(20)]
    splits = make_double_mc("VERBS|sports", rows_a, rows_b, n_max=20, seed=0)
    for example in splits.train:
        question_a, question_b = example.info["question_a"], example.info["question_b"]
        first, second = ("is, football", "are, baseball")
        if example.info["swapped"]:
            first, second = second, first
        assert example.prompt == (
            f"Question: {question_a} | {question_b}\nA. {first}\nB. {second}\nAnswer:"
        )


def test_no_question_is_shared_between_splits_and_repeats_are_dropped():
    rows_a = make_verbs(100, seed=0)
    rows_a += [QARow(rows_a[0].question, rows_a[0].incorrect, rows_a[0].correct)]
    rows_b = make_pronouns(100, seed=0)
    splits = make_double_mc("verbs|PRONOUNS", rows_a, rows_b, n_max=200, seed=0)
    questions = {
        split: {e.info[key] for e in examples for key in ("question_a", "question_b")}
        for split, examples in all_examples(splits).items()
    }
    assert not questions["train"] & questions["val"]
    assert not questions["train"] & questions["test"]
    assert not questions["val"] & questions["test"]
    assert rows_a[0].question not in set().union(*questions.values())
    assert splits.description["repeated_questions_dropped"] == {"a": 2, "b": 0}


def test_each_question_is_used_once_and_from_its_own_side():
    splits, _ = build("pronouns|SPORTS", n_max=200, seed=0)
    examples = [e for group in all_examples(splits).values() for e in group]
    firsts = [parse_prompt(e.prompt)["qa"] for e in examples]
    seconds = [parse_prompt(e.prompt)["qb"] for e in examples]
    assert len(set(firsts)) == len(firsts) and len(set(seconds)) == len(seconds)
    assert set(firsts) <= {row.question for row in make_pronouns(200, seed=0)}
    assert set(seconds) <= {row.question for row in make_sports(200, seed=0)}


def test_n_max_caps_the_pairs_and_the_smaller_side_caps_them_too():
    assert splits_size(make_double_mc("verbs|SENTIMENT", n_max=100)) == 100
    rows_a = make_verbs(50, seed=0)
    rows_b = make_sentiment(80, seed=0)
    assert splits_size(make_double_mc("verbs|SENTIMENT", rows_a, rows_b, n_max=2000)) == 50


def splits_size(splits) -> int:
    return sum(len(examples) for examples in all_examples(splits).values())


def test_same_seed_gives_the_same_splits_and_another_seed_differs():
    first = make_double_mc("SPORTS|pronouns", n_max=60, seed=5)
    assert first.train == make_double_mc("SPORTS|pronouns", n_max=60, seed=5).train
    assert first.train != make_double_mc("SPORTS|pronouns", n_max=60, seed=6).train


def test_too_few_rows_and_bad_rows_are_reported():
    rows = make_verbs(3, seed=0)
    with pytest.raises(CaftError, match="only 3 pairs"):
        make_double_mc("verbs|SENTIMENT", rows, make_sentiment(3), n_max=100)
    with pytest.raises(CaftError, match=re.escape("rows_b[1]: expected a QARow")):
        make_double_mc("verbs|SENTIMENT", rows, [("q", "a", "b"), "oops"], n_max=100)


def test_double_mc_prompts_evaluate_on_a_tiny_model(model, tokenizer):
    splits = make_double_mc("sentiment|VERBS", n_max=40, seed=0)
    result = evaluate_mc(model, tokenizer, splits.eval_sets["test"], batch_size=4)
    assert result.n == 6 and 0.0 <= result.accuracy <= 1.0
    assert set(result.accuracy_by_category) == {"unambiguous"}
