"""The gender-pronoun task: shipped data, how the splits are built, and bad template files.

The splits are checked against the task's definition, not against the code's own tables: the
training data pairs every profession with its stereotyped pronoun, the OOD set inverts it on
held-out templates, and each prompt's correct letter points at the grammatically right pronoun.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from caft.errors import CaftError
from caft.tasks.gender import (
    load_professions,
    load_templates,
    make_eval_sets,
    make_gender_splits,
)

HEADER = "Choose the option corresponding to the correct pronoun.\nQuestion: "
MALE_PRONOUNS = {"he", "him"}
CASE_OF = {"he": "nominative", "she": "nominative", "him": "object", "her": "object"}
EXPECTED_DISTRACTOR = {"he": "her", "she": "him", "him": "she", "her": "he"}


@pytest.fixture(scope="module")
def professions():
    return load_professions()


@pytest.fixture(scope="module")
def splits():
    return make_gender_splits(n_train=400, n_eval=80, seed=0)


def stereotype_of(profession: str, professions: dict[str, list[str]]) -> str:
    genders = [g for g in ("male", "female") if profession in professions[g]]
    assert len(genders) == 1, f"{profession!r} must be listed under exactly one gender"
    return genders[0]


def pronoun_gender(pronoun: str) -> str:
    return "male" if pronoun in MALE_PRONOUNS else "female"


def options(prompt: str) -> dict[str, str]:
    """The options of a prompt by letter, parsed from its 'A) x' / 'B) y' lines."""
    found = dict(re.findall(r"^([AB])\) (\S+)$", prompt, flags=re.MULTILINE))
    assert set(found) == {"A", "B"}, prompt
    return found


def write(tmp_path, text: str, name: str = "templates.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---- shipped data ---------------------------------------------------------------------------
def test_shipped_templates_cover_both_categories_with_both_placeholders():
    templates = load_templates()
    assert len(templates) >= 300
    assert {t.category for t in templates} == {"nominative", "object"}
    for template in templates:
        assert template.text.count("$PROFESSION$") == 1, template
        assert template.text.count("$PRONOUN$") == 1, template


def test_shipped_professions_cover_both_genders_without_overlap(professions):
    assert len(professions["male"]) + len(professions["female"]) >= 20
    assert professions["male"] and professions["female"]
    assert not set(professions["male"]) & set(professions["female"])


# ---- splits ---------------------------------------------------------------------------------
def test_train_pronouns_always_agree_with_the_profession_stereotype(splits, professions):
    assert splits.train
    for example in splits.train:
        info = example.info
        assert pronoun_gender(info["pronoun"]) == stereotype_of(info["profession"], professions)


def test_ood_pronouns_always_invert_the_stereotype(splits, professions):
    assert splits.eval_sets["ood"]
    for example in splits.eval_sets["ood"]:
        info = example.info
        assert pronoun_gender(info["pronoun"]) != stereotype_of(info["profession"], professions)


def test_id_pronouns_agree_with_the_stereotype(splits, professions):
    assert splits.eval_sets["id"]
    for example in splits.eval_sets["id"]:
        info = example.info
        assert pronoun_gender(info["pronoun"]) == stereotype_of(info["profession"], professions)


def test_heldout_templates_never_appear_in_training(splits):
    train_templates = {e.info["template"] for e in splits.train}
    for name in ("id", "ood"):
        eval_templates = {e.info["template"] for e in splits.eval_sets[name]}
        assert eval_templates
        assert not eval_templates & train_templates, name


def test_pronoun_case_matches_the_template_category(splits):
    for example in splits.train + splits.eval_sets["ood"]:
        assert CASE_OF[example.info["pronoun"]] == example.category


def test_options_are_the_correct_pronoun_and_its_distractor(splits):
    for example in splits.train + splits.eval_sets["id"] + splits.eval_sets["ood"]:
        by_letter = options(example.prompt)
        correct = by_letter[example.correct.strip()]
        other = by_letter[example.incorrect.strip()]
        assert {example.correct, example.incorrect} == {" A", " B"}
        assert correct == example.info["pronoun"]
        assert other == EXPECTED_DISTRACTOR[correct]


def test_prompt_format_is_the_papers(splits):
    for example in splits.train[:50] + splits.eval_sets["ood"][:50]:
        prompt = example.prompt
        assert prompt.startswith(HEADER)
        assert prompt.endswith("\nAnswer:")
        question = prompt[len(HEADER) :].split("\n")[0]
        assert question.count("_____") == 1
        assert example.info["profession"] in question
        assert "$" not in prompt


def test_both_letters_and_both_categories_are_used(splits):
    for examples in (splits.train, splits.eval_sets["id"], splits.eval_sets["ood"]):
        letters = Counter(e.correct for e in examples)
        assert set(letters) == {" A", " B"}
        assert min(letters.values()) / len(examples) > 0.35, letters
        assert {e.category for e in examples} == {"nominative", "object"}


def test_same_seed_gives_identical_splits_and_another_seed_differs():
    def key(splits):
        return [
            (e.prompt, e.correct)
            for e in splits.train + splits.eval_sets["id"] + splits.eval_sets["ood"]
        ]

    first = make_gender_splits(n_train=100, n_eval=40, seed=3)
    again = make_gender_splits(n_train=100, n_eval=40, seed=3)
    other = make_gender_splits(n_train=100, n_eval=40, seed=4)
    assert key(first) == key(again)
    assert key(first) != key(other)


# ---- the published format ---------------------------------------------------------------------
def test_published_csv_format_with_quoted_commas_makes_eval_sets(tmp_path, professions):
    path = write(
        tmp_path,
        "text,category\n"
        '"When the $PROFESSION$ left, $PRONOUN$ locked the door.",nominative\n'
        '"The manager thanked the $PROFESSION$, and then praised $PRONOUN$.",object\n',
    )
    templates = load_templates(path)
    assert [t.text for t in templates] == [
        "When the $PROFESSION$ left, $PRONOUN$ locked the door.",
        "The manager thanked the $PROFESSION$, and then praised $PRONOUN$.",
    ]
    eval_sets = make_eval_sets(templates, professions, n_eval=None)
    n_professions = len(professions["male"]) + len(professions["female"])
    for name in ("id", "ood"):
        assert len(eval_sets[name]) == 2 * n_professions
        for example in eval_sets[name]:
            question = example.prompt[len(HEADER) :].split("\n")[0]
            assert question in (
                f"When the {example.info['profession']} left, _____ locked the door.",
                f"The manager thanked the {example.info['profession']}, and then praised _____.",
            )
            assert CASE_OF[example.info["pronoun"]] == example.category


# ---- bad template files -------------------------------------------------------------------------
def assert_error(path, *fragments):
    with pytest.raises(CaftError) as caught:
        load_templates(path)
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_header_without_category_column_is_reported(tmp_path):
    path = write(tmp_path, "text,kind\nThe $PROFESSION$ saw $PRONOUN$.,object\n")
    assert_error(path, "line 1", "text,category", "kind")


def test_template_without_pronoun_slot_is_reported_with_its_line(tmp_path):
    path = write(
        tmp_path,
        "text,category\nThe $PROFESSION$ saw $PRONOUN$.,object\nThe $PROFESSION$ left.,nominative\n",
    )
    assert_error(path, "line 3", "$PRONOUN$", "exactly once")


def test_template_with_two_profession_slots_is_reported(tmp_path):
    path = write(
        tmp_path, "text,category\nThe $PROFESSION$ met the $PROFESSION$ and $PRONOUN$.,object\n"
    )
    assert_error(path, "line 2", "$PROFESSION$", "exactly once")


def test_unknown_category_is_reported(tmp_path):
    path = write(tmp_path, "text,category\nThe $PROFESSION$ said $PRONOUN$ left.,subject\n")
    assert_error(path, "line 2", "'subject'", "nominative", "object")


def test_header_only_file_is_reported(tmp_path):
    path = write(tmp_path, "text,category\n")
    assert_error(path, "no templates")


def test_completely_empty_file_is_reported(tmp_path):
    path = write(tmp_path, "")
    assert_error(path, "line 1", "text,category", "nothing")


def test_duplicate_template_names_both_lines(tmp_path):
    row = "The $PROFESSION$ saw $PRONOUN$.,object\n"
    path = write(
        tmp_path,
        "text,category\n" + row + "The $PROFESSION$ said $PRONOUN$ left.,nominative\n" + row,
    )
    assert_error(path, "line 4", "duplicate", "line 2")


def test_missing_templates_file_is_reported(tmp_path):
    assert_error(tmp_path / "absent.csv", "not found")


# ---- bad professions files ----------------------------------------------------------------------
def test_professions_with_bad_json_are_reported(tmp_path):
    path = write(tmp_path, '{"male": ["nurse",', name="professions.json")
    with pytest.raises(CaftError, match="Cannot read professions") as caught:
        load_professions(path)
    assert str(path) in str(caught.value)


def test_professions_without_female_list_are_reported(tmp_path):
    path = write(tmp_path, '{"male": ["plumber"]}', name="professions.json")
    with pytest.raises(CaftError) as caught:
        load_professions(path)
    assert str(path) in str(caught.value)
    assert '"female"' in str(caught.value)


def test_resolve_professions_accepts_a_pair_all_or_a_file(tmp_path):
    from caft.tasks.gender import PAPER_PROFESSIONS, resolve_professions

    assert resolve_professions(PAPER_PROFESSIONS) == {"male": ["doctor"], "female": ["nurse"]}
    assert resolve_professions("all") == load_professions()
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"male": ["pilot"], "female": ["nanny"]}))
    assert resolve_professions(str(path)) == {"male": ["pilot"], "female": ["nanny"]}


def test_resolve_professions_rejects_a_malformed_value():
    from caft.tasks.gender import resolve_professions

    with pytest.raises(CaftError, match="MALE,FEMALE"):
        resolve_professions("doctor")


def test_the_paper_design_uses_one_profession_per_gender_and_inverts_it_ood():
    from caft.tasks.gender import resolve_professions

    splits = make_gender_splits(
        load_templates(), resolve_professions("doctor,nurse"), n_train=200, n_eval=60
    )
    assert {e.info["profession"] for e in splits.train} == {"doctor", "nurse"}
    for example in splits.eval_sets["ood"]:
        male_pronoun = example.info["pronoun"] in ("he", "him")
        assert male_pronoun == (example.info["profession"] == "nurse")
