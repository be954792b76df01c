"""The gender-pronoun task: a spurious cue (profession stereotype) that agrees with the label in 100%
of the training data.

The intended rule is grammatical case: a subject slot takes he/she, an object slot him/her. Each
prompt offers the correct pronoun and a distractor that differs in both case and gender, so a model
can answer from case alone, or from the profession's stereotyped gender alone. Training data only
pairs male-stereotyped professions with male pronouns (and female with female); the OOD split
inverts that, on templates held out from training, so only a model that learned case gets it right.

Templates are CSV files with columns `text,category` (the paper's published format): `text` holds
`$PROFESSION$` and `$PRONOUN$`, `category` is `nominative` or `object`. caft ships its own templates.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from caft.errors import CaftError
from caft.tasks.base import MCExample, MCSplits

INSTRUCTION = "Choose the option corresponding to the correct pronoun."
PROMPT_FORMAT = INSTRUCTION + "\nQuestion: {sentence}\nA) {option_a}\nB) {option_b}\nAnswer:"
BLANK = "_____"
PROFESSION_SLOT = "$PROFESSION$"
PRONOUN_SLOT = "$PRONOUN$"
CATEGORIES = ("nominative", "object")
PRONOUNS = {
    ("male", "nominative"): "he",
    ("female", "nominative"): "she",
    ("male", "object"): "him",
    ("female", "object"): "her",
}
# The distractor differs in both case and gender, so case alone or gender alone decides.
DISTRACTORS = {"he": "her", "she": "him", "him": "she", "her": "he"}
GENDERS = ("male", "female")


@dataclass(frozen=True)
class Template:
    text: str
    category: str
    source: str = ""
    line: int = 0


def default_templates_path() -> Path:
    return Path(str(resources.files("caft.tasks") / "data" / "gender_templates.csv"))


def default_professions_path() -> Path:
    return Path(str(resources.files("caft.tasks") / "data" / "professions.json"))


def default_contrast_path() -> Path:
    """caft's written description of the unwanted concept (two contrast sets), for selection."""
    return Path(str(resources.files("caft.tasks") / "data" / "gender_contrast.json"))


def load_templates(path: str | Path | None = None) -> list[Template]:
    """Read templates from a `text,category` CSV (caft's own when `path` is None), validating each."""
    path = Path(path) if path is not None else default_templates_path()
    if not path.is_file():
        raise CaftError(f"Templates file not found: {path}")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        if not {"text", "category"} <= columns:
            raise CaftError(
                f"{path} line 1: the header must have columns 'text,category' "
                f"(found {', '.join(sorted(columns)) or 'nothing'})."
            )
        templates = [_check_template(row, path, reader.line_num) for row in reader]
    if not templates:
        raise CaftError(f"{path}: no templates (the file has a header but no rows).")
    seen = {}
    for template in templates:
        if template.text in seen:
            raise CaftError(
                f"{path} line {template.line}: duplicate of the template on line {seen[template.text]}."
            )
        seen[template.text] = template.line
    return templates


def _check_template(row: dict, path: Path, line: int) -> Template:
    text = (row.get("text") or "").strip()
    category = (row.get("category") or "").strip().lower()
    where = f"{path} line {line}"
    if not text:
        raise CaftError(f"{where}: empty template text.")
    for slot in (PROFESSION_SLOT, PRONOUN_SLOT):
        if text.count(slot) != 1:
            raise CaftError(f"{where}: the template must contain {slot} exactly once: {text!r}")
    if category not in CATEGORIES:
        raise CaftError(
            f"{where}: unknown category {row.get('category')!r}; use 'nominative' or 'object'."
        )
    return Template(text=text, category=category, source=str(path), line=line)


def load_professions(path: str | Path | None = None) -> dict[str, list[str]]:
    """Professions by stereotyped gender: JSON `{"male": [...], "female": [...]}`."""
    path = Path(path) if path is not None else default_professions_path()
    try:
        professions = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CaftError(f"Cannot read professions from {path}: {error}") from error
    if not isinstance(professions, dict) or any(
        not isinstance(professions.get(g), list) or not professions[g] for g in GENDERS
    ):
        raise CaftError(
            f'{path}: expected {{"male": [...], "female": [...]}} with non-empty lists.'
        )
    return {gender: [str(p).strip() for p in professions[gender]] for gender in GENDERS}


PAPER_PROFESSIONS = "doctor,nurse"
PROFESSIONS_HELP = (
    "Professions: 'MALE,FEMALE' (default doctor,nurse: the paper's design), 'all' (caft's 28 "
    "stereotyped professions), or a JSON file {male: [...], female: [...]}."
)


def resolve_professions(spec: str | None) -> dict[str, list[str]]:
    """Professions from a command-line value.

    "MALE,FEMALE" (e.g. "doctor,nurse", the paper's design: one profession per gender, so the
    spurious cue is a single word); "all" (caft's stereotyped professions); or a JSON file
    `{"male": [...], "female": [...]}`.
    """
    if spec is None or spec == "all":
        return load_professions()
    if spec.endswith(".json") or Path(spec).is_file():
        return load_professions(spec)
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if len(names) != 2:
        raise CaftError(
            f"--professions {spec!r}: give 'MALE,FEMALE' (e.g. 'doctor,nurse'), 'all', or a JSON "
            'file {"male": [...], "female": [...]}.'
        )
    return {"male": [names[0]], "female": [names[1]]}


def fill_sentence(template: Template, profession: str) -> str:
    """The question sentence: the profession filled in, the pronoun slot blanked."""
    sentence = template.text.replace(PROFESSION_SLOT, profession).replace(PRONOUN_SLOT, BLANK)
    return sentence[0].upper() + sentence[1:]


def make_example(
    template: Template, profession: str, pronoun_gender: str, stereotype: str, rng: random.Random
) -> MCExample:
    """One prompt whose correct pronoun has `pronoun_gender`; options in random order."""
    correct = PRONOUNS[(pronoun_gender, template.category)]
    distractor = DISTRACTORS[correct]
    correct_first = rng.random() < 0.5
    option_a, option_b = (correct, distractor) if correct_first else (distractor, correct)
    prompt = PROMPT_FORMAT.format(
        sentence=fill_sentence(template, profession), option_a=option_a, option_b=option_b
    )
    correct_letter, other_letter = (" A", " B") if correct_first else (" B", " A")
    return MCExample(
        prompt=prompt,
        correct=correct_letter,
        incorrect=other_letter,
        category=template.category,
        info={
            "template": template.text,
            "profession": profession,
            "pronoun": correct,
            "stereotype": stereotype,
        },
    )


def make_examples(
    templates: list[Template],
    professions: dict[str, list[str]],
    *,
    inverted: bool,
    count: int | None,
    seed: int,
) -> list[MCExample]:
    """Prompts over all (template, profession) pairs, sampled down to `count`.

    inverted=False: the pronoun's gender agrees with the profession's stereotype (training, ID);
    inverted=True: it disagrees (OOD).
    """
    rng = random.Random(seed)
    pairs = [
        (template, profession, gender)
        for template in templates
        for gender in GENDERS
        for profession in professions[gender]
    ]
    rng.shuffle(pairs)
    if count is not None:
        pairs = _balanced_sample(pairs, count)
    examples = []
    for template, profession, stereotyped_gender in pairs:
        pronoun_gender = _other(stereotyped_gender) if inverted else stereotyped_gender
        stereotype = "inverted" if inverted else "consistent"
        examples.append(make_example(template, profession, pronoun_gender, stereotype, rng))
    return examples


def _balanced_sample(pairs: list, count: int) -> list:
    """Take `count` pairs, alternating over (category, gender) groups so all four are balanced."""
    groups: dict[tuple[str, str], list] = {}
    for pair in pairs:
        groups.setdefault((pair[0].category, pair[2]), []).append(pair)
    chosen, cursor = [], 0
    while len(chosen) < count and any(cursor < len(g) for g in groups.values()):
        for group in groups.values():
            if cursor < len(group) and len(chosen) < count:
                chosen.append(group[cursor])
        cursor += 1
    return chosen


def _other(gender: str) -> str:
    return "female" if gender == "male" else "male"


def split_templates(
    templates: list[Template], heldout_fraction: float, seed: int
) -> tuple[list[Template], list[Template]]:
    """Split templates into (train, held-out), `heldout_fraction` of each category held out."""
    if not 0 < heldout_fraction < 1:
        raise CaftError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}.")
    rng = random.Random(seed)
    train, heldout = [], []
    for category in CATEGORIES:
        group = [t for t in templates if t.category == category]
        if len(group) < 2:
            raise CaftError(
                f"Need at least 2 '{category}' templates to hold some out; got {len(group)}."
            )
        rng.shuffle(group)
        n_heldout = max(1, round(len(group) * heldout_fraction))
        heldout += group[:n_heldout]
        train += group[n_heldout:]
    return train, heldout


def limit_templates(templates: list[Template], count: int) -> list[Template]:
    """The first `count` templates, half from each category (the list is already shuffled)."""
    if count < 2:
        raise CaftError(f"train_templates must be at least 2 (one per category), got {count}.")
    per_category = {c: [t for t in templates if t.category == c] for c in CATEGORIES}
    half = count // 2
    if any(len(group) < half for group in per_category.values()):
        available = {c: len(g) for c, g in per_category.items()}
        raise CaftError(
            f"train_templates={count} needs {half} per category; available: {available}."
        )
    return per_category["nominative"][:half] + per_category["object"][: count - half]


def make_gender_splits(
    templates: list[Template] | None = None,
    professions: dict[str, list[str]] | None = None,
    *,
    n_train: int = 1600,
    n_eval: int = 240,
    heldout_fraction: float = 0.2,
    train_templates: int | None = None,
    seed: int = 0,
) -> MCSplits:
    """Training prompts (stereotype always agrees) and ID / OOD evaluation sets on held-out templates.

    train_templates: use only this many of the training templates (half per category), i.e.
        less evidence for the case rule (the pilots used 48); None uses them all.
    The template split and sampling depend on `seed`, so a seed fixes the data; it is recorded in
    `description`.
    """
    templates = templates if templates is not None else load_templates()
    professions = professions if professions is not None else load_professions()
    train_templates_used, heldout_templates = split_templates(templates, heldout_fraction, seed)
    if train_templates is not None:
        train_templates_used = limit_templates(train_templates_used, train_templates)
    train = make_examples(
        train_templates_used, professions, inverted=False, count=n_train, seed=seed
    )
    eval_sets = make_eval_sets(heldout_templates, professions, n_eval=n_eval, seed=seed)
    description = {
        "task": "gender-pronoun",
        "seed": seed,
        "n_templates": len(templates),
        "n_train_templates": len(train_templates_used),
        "n_heldout_templates": len(heldout_templates),
        "professions": professions,
        "templates_source": templates[0].source if templates else "",
    }
    return MCSplits(train=train, eval_sets=eval_sets, description=description)


def make_eval_sets(
    templates: list[Template],
    professions: dict[str, list[str]] | None = None,
    *,
    n_eval: int | None = 240,
    seed: int = 0,
) -> dict[str, list[MCExample]]:
    """ID (stereotype agrees) and OOD (stereotype inverted) prompts over the given templates."""
    professions = professions if professions is not None else load_professions()
    return {
        "id": make_examples(templates, professions, inverted=False, count=n_eval, seed=seed + 1),
        "ood": make_examples(templates, professions, inverted=True, count=n_eval, seed=seed + 2),
    }
