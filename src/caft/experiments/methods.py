"""The methods an experiment compares, as objects: CAFT and the paper's baselines.

Every method is one `Method`: a name, the shared steps it reuses (the plain fine-tune, the PCA
candidates, the automatic selection of a task and seed; see `caft.experiments.runner`) and a
function that turns a run's context into its evaluation. The runner knows nothing of what a method
does, so a new baseline is one function and one registry entry.

| method             | trains                          | directions ablated                                  |
|--------------------|---------------------------------|-----------------------------------------------------|
| none               | plain fine-tune (shared)        | –                                                   |
| caft_pca           | fine-tune with ablation         | PCA candidates chosen by the contrast rule          |
| caft_sae           | fine-tune with ablation         | SAE latents (three rankings) chosen by the rule     |
| random             | fine-tune with ablation         | random, same count at the same layers as caft_pca   |
| top_k              | fine-tune with ablation         | the k highest-variance PCs per layer, no reading    |
| random_orthonormal | fine-tune with ablation         | k random orthonormal vectors per discovery layer    |
| test_time_only     | none (the plain model)          | caft_pca's selection, hooks on at evaluation only   |
| fewer_steps        | plain fine-tune, fewer steps    | –                                                   |

Automatic selection without OOD data (`contrast_description_from_rows`): the unwanted concept is
described by contrast sets made from the training rows of the sub-task whose concept is ablated.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from caft.concepts import ConceptSet, Provenance, direction_id
from caft.errors import CaftError
from caft.selection import (
    CandidateScore,
    ConceptDescription,
    ContrastSet,
    random_directions,
    random_directions_like,
)
from caft.tasks.base import MCExample
from caft.tasks.double_mc import QARow, material_path

if TYPE_CHECKING:
    from caft.experiments.runner import RunContext

# Seeds of the random baselines are offset from the run seed so they never coincide with the
# training seed's own random stream (the demo uses the same offset for its control).
RANDOM_SEED_OFFSET = 10_000
RANDOM_ORTHONORMAL_SEED_OFFSET = 20_000
MIN_TEXTS_PER_POLE = 5

# The shared steps a method may need, in the order they are computed.
SHARED_STEPS = ("plain", "candidates", "selection")


@dataclass(frozen=True)
class Method:
    """One column of the results table."""

    name: str
    description: str
    needs: tuple[str, ...]  # shared steps of the (task, seed) it reuses, from SHARED_STEPS
    run: Callable[[RunContext], dict]

    @property
    def rank(self) -> int:
        """Methods needing more shared state run first, so a pool computes shared steps early."""
        return -len(self.needs)


# ---- the methods ---------------------------------------------------------------------------------
def run_none(ctx: RunContext) -> dict:
    """The plain fine-tune (the shared one: every method of this task and seed is compared to it)."""
    return ctx.record_plain()


def run_caft_pca(ctx: RunContext) -> dict:
    return ctx.train_and_evaluate(ctx.selection())


def run_random(ctx: RunContext) -> dict:
    """Random directions, as many as caft_pca selected and at the same layers."""
    concepts = random_directions_like(ctx.selection(), seed=RANDOM_SEED_OFFSET + ctx.seed)
    return ctx.train_and_evaluate(concepts)


def run_top_k(ctx: RunContext) -> dict:
    return ctx.train_and_evaluate(top_k_directions(ctx.candidates(), ctx.settings.baseline_k))


def run_random_orthonormal(ctx: RunContext) -> dict:
    concepts = random_orthonormal_directions(
        ctx.discovery_layers(),
        ctx.d_model(),
        ctx.settings.baseline_k,
        seed=RANDOM_ORTHONORMAL_SEED_OFFSET + ctx.seed,
        model=ctx.model_description(),
    )
    return ctx.train_and_evaluate(concepts)


def run_test_time_only(ctx: RunContext) -> dict:
    """Train normally (the shared plain model), ablate caft_pca's selection only when evaluating."""
    return ctx.evaluate_plain_with_hooks(ctx.selection())


def run_fewer_steps(ctx: RunContext) -> dict:
    fraction = ctx.settings.fewer_steps_fraction
    steps = max(1, round(ctx.total_steps() * fraction))
    return ctx.train_and_evaluate(None, steps=steps)


def run_caft_sae(ctx: RunContext) -> dict:
    """CAFT with SAE latents: ranked by `caft.discovery.sae.rank`, chosen by the contrast rule."""
    if not ctx.settings.saes:
        raise CaftError(
            "caft_sae needs SAEs: list them under `saes:` in the experiment config, one per layer "
            "(a folder, a Hub id or a SAELens release; as a mapping {source, sae_id, layer} where "
            "the files do not say the layer), or remove caft_sae from the methods."
        )
    return ctx.train_and_evaluate(ctx.selection("sae"))


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("none", "plain fine-tune, no ablation", ("plain",), run_none),
        Method(
            "caft_pca",
            "CAFT: PCA candidates chosen by the contrast rule, ablated while training",
            SHARED_STEPS,
            run_caft_pca,
        ),
        Method(
            "caft_sae",
            "CAFT: SAE latents chosen by the contrast rule, ablated while training",
            SHARED_STEPS,
            run_caft_sae,
        ),
        Method(
            "random", "random directions, caft_pca's count and layers", SHARED_STEPS, run_random
        ),
        Method("top_k", "the k highest-variance PCs per layer", ("plain", "candidates"), run_top_k),
        Method(
            "random_orthonormal",
            "k random orthonormal vectors per discovery layer",
            (),
            run_random_orthonormal,
        ),
        Method(
            "test_time_only",
            "plain fine-tune, caft_pca's selection ablated at evaluation only",
            SHARED_STEPS,
            run_test_time_only,
        ),
        Method("fewer_steps", "plain fine-tune with a fraction of the steps", (), run_fewer_steps),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise CaftError(f"Unknown method {name!r}; choose from {', '.join(METHODS)}.")
    return METHODS[name]


# ---- direction sets of the baselines ------------------------------------------------------------
def top_k_directions(candidates: ConceptSet, k: int) -> ConceptSet:
    """The `k` candidates with the highest discovery score (explained variance) at every layer."""
    if k < 1:
        raise CaftError(f"baseline_k must be at least 1, got {k}.")
    chosen = []
    for layer in candidates.layers:
        infos = sorted(
            candidates.infos_at(layer),
            key=lambda info: -(info.score if info.score is not None else float("-inf")),
        )
        chosen += [info.id for info in infos[:k]]
    rule = f"top-{k} per layer by explained variance (no interpretation)"
    selected = candidates.subset(chosen, selection=rule)
    for info in selected.infos:
        info.selected_by = f"top-{k}"
    return selected


def random_orthonormal_directions(
    layers: Sequence[int], d_model: int, k: int, *, seed: int, model: str = ""
) -> ConceptSet:
    """`k` random orthonormal vectors at each of `layers` (Gaussian, then QR), from `seed`."""
    if k < 1:
        raise CaftError(f"baseline_k must be at least 1, got {k}.")
    if not layers:
        raise CaftError("random_orthonormal needs at least one layer.")
    provenance = Provenance(
        model=model,
        method="random-orthonormal",
        data="none",
        selection=f"random orthonormal baseline: {k} per layer at layers {sorted(layers)}, seed {seed}",
    )
    return random_directions(
        {layer: k for layer in sorted(layers)}, d_model, seed=seed, provenance=provenance,
        selected_by="random-orthonormal",
    )  # fmt: skip


# ---- the unwanted concept, described from training rows ------------------------------------------
def ablated_rows_from_training(train: Sequence[MCExample]) -> tuple[str, list[QARow]]:
    """(sub-task, its rows) of the ablated question of double-MC training prompts.

    Training prompts are ambiguous: the option holding the right letter holds both questions'
    correct answers, so the ablated question's own label is part of the training data.
    """
    if not train or "ablated" not in train[0].info:
        raise CaftError("Expected double multiple-choice training examples (with info['ablated']).")
    info = train[0].info
    position = "b" if info["intended_question"] == "a" else "a"
    index = 0 if position == "a" else 1
    rows = []
    for example in train:
        options, letter = example.info["options"], example.info[f"answer_{position}"]
        other = "B" if letter == "A" else "A"
        rows.append(
            QARow(
                example.info[f"question_{position}"],
                options[letter][index],
                options[other][index],
            )
        )
    return info["ablated"], rows


def answer_poles(subtask: str) -> dict[str, str]:
    """Answer -> pole for sub-tasks whose answers come in more than two forms.

    verbs: is/has/does/goes are `singular`, are/have/do/go `plural`; pronouns: he/she/they are
    `nominative`, him/her/them `object`. Sentiment and sports group by the answer itself.
    """
    import json

    if subtask == "verbs":
        verbs = json.loads(material_path("verbs").read_text(encoding="utf-8"))["verbs"]
        return {v[number]: number for v in verbs for number in ("singular", "plural")}
    if subtask == "pronouns":
        pronouns = json.loads(material_path("pronouns").read_text(encoding="utf-8"))["pronouns"]
        return {word: case for case, words in pronouns.items() for word in words}
    return {}


def contrast_description_from_rows(
    subtask: str, rows: Sequence[QARow], *, max_per_pole: int = 100, seed: int = 0
) -> tuple[ConceptDescription, str]:
    """A description of `subtask`'s concept from its own questions, grouped by correct answer.

    Returns (description, how to combine the sets: "all" or "any").

    Why this is legitimate: the rows come from the training split only, which the plain fine-tune
    has already seen; their labels are training labels (in a double-MC training prompt the correct
    option holds both questions' answers). No validation, test or OOD item is used. The texts are
    the ablated question alone, not the whole prompt, so the intended question and the answer
    letter play no part; and since rows of the two sub-tasks are paired at random, the intended
    question's label is balanced across the poles. What remains is what the paper assumes a user
    knows: which concept is unwanted, shown by examples of its poles.

    Two poles (singular vs plural subjects, positive vs negative reviews, nominative vs object
    pronouns) give one contrast set, and a candidate must beat its null ("all"). More answers
    (sports: football / basketball / baseball) give one set per answer against the rest; a
    direction that separates any one of them from the others is part of the concept ("any").
    """
    poles_of = answer_poles(subtask)
    groups: dict[str, list[str]] = {}
    for row in rows:
        groups.setdefault(poles_of.get(row.correct, row.correct), []).append(row.question)
    rng = _random.Random(seed)
    for texts in groups.values():
        rng.shuffle(texts)
    too_few = {
        pole: len(texts) for pole, texts in groups.items() if len(texts) < MIN_TEXTS_PER_POLE
    }
    if len(groups) < 2 or too_few:
        raise CaftError(
            f"Cannot describe the {subtask} concept from its training rows: need at least two "
            f"answers with {MIN_TEXTS_PER_POLE} questions each, got "
            f"{ {pole: len(texts) for pole, texts in groups.items()} }. Use more training data."
        )
    names = sorted(groups)
    if len(names) == 2:
        sets = [ContrastSet(f"{names[0]} vs {names[1]}", _poles(groups, names[0], names[1:]))]
        combine = "all"
    else:
        sets = [
            ContrastSet(f"{name} vs other", _poles(groups, name, [n for n in names if n != name]))
            for name in names
        ]
        combine = "any"
    sets = [_cap(contrast, max_per_pole, rng) for contrast in sets]
    description = ConceptDescription(
        concept=subtask,
        description=f"The {subtask} question's answer ({' / '.join(names)}), from its own "
        "training questions grouped by correct answer.",
        contrast_sets=sets,
        examples=[row.question for row in rows[:5]],
    )
    return description, combine


def _poles(groups: dict[str, list[str]], name: str, others: Sequence[str]) -> dict[str, list[str]]:
    rest = [text for other in others for text in groups[other]]
    return {name: list(groups[name]), "+".join(others): rest}


def _cap(contrast: ContrastSet, max_per_pole: int, rng: _random.Random) -> ContrastSet:
    poles = {}
    for pole, texts in contrast.poles.items():
        texts = list(texts)
        rng.shuffle(texts)
        poles[pole] = texts[:max_per_pole]
    return ContrastSet(contrast.name, poles)


def combine_scores(scores: list[CandidateScore], how: str) -> list[CandidateScore]:
    """Re-score candidates when beating the null on any one set suffices (`how="any"`).

    `score_candidates` scores a candidate by its worst set (min of |d| / null over sets), the
    right rule when every set describes the whole concept; one-vs-rest sets each describe a part.
    """
    if how == "all":
        return scores
    if how != "any":
        raise CaftError(f"Unknown way to combine contrast sets {how!r}; use 'all' or 'any'.")
    for score in scores:
        ratios = [s["abs_d"] / max(s["null"], 1e-12) for s in score.by_set.values()]
        score.score = round(max(ratios), 4)
        score.passes = score.score > 1.0
    return scores


def best_candidate(scores: Sequence[CandidateScore]) -> str:
    """The single best-scoring candidate: the fallback when none beats the null."""
    best = max(scores, key=lambda s: s.score)
    return direction_id(best.layer, best.candidate_index)


# ---- SAEs ------------------------------------------------------------------------------------------
SAE_ENTRY_KEYS = {"source", "sae_id", "layer"}


def check_sae_entries(entries: Sequence) -> list[dict]:
    """The config's `saes` as {source, sae_id, layer} mappings (a bare string is a source)."""
    checked = []
    for index, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"source": entry}
        if not isinstance(entry, dict) or "source" not in entry or set(entry) - SAE_ENTRY_KEYS:
            raise CaftError(
                f"saes[{index}]: {entry!r}; write a folder / Hub id / SAELens release, or a mapping "
                "{source: ..., sae_id: ..., layer: ...} (sae_id and layer optional)."
            )
        checked.append({"source": str(entry["source"]), "sae_id": entry.get("sae_id"),
                        "layer": entry.get("layer")})  # fmt: skip
    return checked


def load_experiment_saes(entries: Sequence) -> dict:
    """{decoder layer: SparseAutoencoder} from the config's `saes`, one SAE per layer."""
    from caft.discovery.sae.formats import load_sae

    saes = {}
    for entry in check_sae_entries(entries):
        sae = load_sae(entry["source"], sae_id=entry["sae_id"], hook_layer=entry["layer"])
        if sae.hook_layer is None:
            raise CaftError(
                f"SAE {entry['source']}: its files do not say which decoder layer it reads; give "
                "it as {source: ..., layer: N} in the config's saes."
            )
        if sae.hook_layer in saes:
            raise CaftError(f"saes: two SAEs for layer {sae.hook_layer}; give one per layer.")
        saes[sae.hook_layer] = sae
    return dict(sorted(saes.items()))
