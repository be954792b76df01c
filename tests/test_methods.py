"""The experiment's methods: the baselines' direction sets and the concept description made from the
ablated sub-task's own training rows (no OOD data)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from caft.concepts import ConceptSet, DirectionInfo, Provenance
from caft.errors import CaftError
from caft.experiments.methods import (
    METHODS,
    ablated_rows_from_training,
    check_sae_entries,
    combine_scores,
    contrast_description_from_rows,
    get_method,
    random_orthonormal_directions,
    run_caft_sae,
    top_k_directions,
)
from caft.experiments.runner import ExperimentConfig
from caft.selection import CandidateScore, random_directions_like
from caft.tasks.double_mc import QARow, make_double_mc, make_rows


def candidates_with_scores(scores_by_layer: dict[int, list[float]], d_model: int = 16):
    generator = torch.Generator().manual_seed(0)
    raw = {
        layer: torch.randn(len(scores), d_model, generator=generator)
        for layer, scores in scores_by_layer.items()
    }
    infos = [
        DirectionInfo(layer=layer, candidate_index=index, score=score)
        for layer, scores in scores_by_layer.items()
        for index, score in enumerate(scores)
    ]
    return ConceptSet(raw, provenance=Provenance(method="pca"), infos=infos)


def test_top_k_keeps_the_highest_variance_candidates_per_layer():
    candidates = candidates_with_scores({2: [0.1, 0.5, 0.3, 0.05], 5: [0.02, 0.01, 0.4]})
    chosen = top_k_directions(candidates, 2)
    assert chosen.ids() == ["L2.1", "L2.2", "L5.0", "L5.2"]
    assert torch.allclose(chosen.direction("L2.1"), candidates.direction("L2.1"), atol=1e-5)
    assert top_k_directions(candidates, 1).ids() == ["L2.1", "L5.2"]
    with pytest.raises(CaftError, match="baseline_k"):
        top_k_directions(candidates, 0)


def test_random_orthonormal_vectors_are_orthonormal_at_every_layer_and_seeded():
    concepts = random_orthonormal_directions([0, 3, 7], 32, 4, seed=5, model="m")
    assert concepts.count_by_layer() == {0: 4, 3: 4, 7: 4}
    for basis in concepts.bases_by_layer.values():
        assert torch.allclose(basis @ basis.T, torch.eye(4), atol=1e-5)
    again = random_orthonormal_directions([0, 3, 7], 32, 4, seed=5)
    other = random_orthonormal_directions([0, 3, 7], 32, 4, seed=6)
    assert torch.equal(concepts.bases_by_layer[3], again.bases_by_layer[3])
    assert not torch.allclose(concepts.bases_by_layer[3], other.bases_by_layer[3])
    assert concepts.provenance.method == "random-orthonormal"
    # different layers get different vectors
    assert not torch.allclose(concepts.bases_by_layer[0], concepts.bases_by_layer[3])


def test_random_control_has_the_selections_count_and_layers():
    selection = candidates_with_scores({1: [0.3, 0.2], 4: [0.1]}, d_model=24)
    control = random_directions_like(selection, seed=10_000)
    assert control.count_by_layer() == selection.count_by_layer()
    overlap = (control.bases_by_layer[1] @ selection.bases_by_layer[1].T).abs().max()
    assert overlap < 0.9


def test_verbs_rows_are_described_by_subject_number():
    rows = make_rows("verbs", 200, seed=1)
    description, combine = contrast_description_from_rows("verbs", rows, max_per_pole=30)
    assert combine == "all" and len(description.contrast_sets) == 1
    poles = description.contrast_sets[0].poles
    assert set(poles) == {"plural", "singular"}
    answer = {row.question: row.correct for row in rows}
    assert {answer[q] for q in poles["singular"]} <= {"is", "has", "does", "goes"}
    assert {answer[q] for q in poles["plural"]} <= {"are", "have", "do", "go"}
    assert all(len(texts) == 30 for texts in poles.values())


@pytest.mark.parametrize(
    ("subtask", "pole_names"),
    [("sentiment", {"negative", "positive"}), ("pronouns", {"nominative", "object"})],
)
def test_binary_sub_tasks_give_one_contrast_set(subtask, pole_names):
    rows = make_rows(subtask, 120, seed=0)
    description, combine = contrast_description_from_rows(subtask, rows)
    assert combine == "all"
    assert set(description.contrast_sets[0].poles) == pole_names
    questions = {row.question for row in rows}
    assert all(
        q in questions for texts in description.contrast_sets[0].poles.values() for q in texts
    )


def test_three_answers_give_one_against_the_rest_sets_combined_by_any():
    rows = make_rows("sports", 90, seed=0)
    description, combine = contrast_description_from_rows("sports", rows)
    assert combine == "any"
    assert [c.name for c in description.contrast_sets] == [
        "baseball vs other",
        "basketball vs other",
        "football vs other",
    ]


def test_too_few_rows_for_a_pole_is_a_clear_error():
    rows = [QARow(f"q{i}", "positive", "negative") for i in range(10)]
    rows += [QARow("q-neg", "negative", "positive")]
    with pytest.raises(CaftError, match="at least two answers with 5 questions"):
        contrast_description_from_rows("sentiment", rows)


@pytest.mark.parametrize("setting", ["verbs|SENTIMENT", "SENTIMENT|verbs", "pronouns|VERBS"])
def test_the_ablated_questions_rows_come_from_training_prompts_with_their_labels(setting):
    splits = make_double_mc(setting, n_max=200, seed=3)
    subtask, rows = ablated_rows_from_training(splits.train)
    ablated = splits.description["ablated"]
    assert subtask == ablated
    truth = {row.question: row for row in make_rows(ablated, 200, seed=3)}
    assert len(rows) == len(splits.train)
    assert all(truth[row.question] == row for row in rows)
    # nothing from the evaluation splits
    position = "a" if splits.description["first"] == ablated else "b"
    held_out = {e.info[f"question_{position}"] for s in splits.eval_sets.values() for e in s}
    assert not held_out & {row.question for row in rows}


def test_any_combination_keeps_a_candidate_that_beats_one_set():
    score = CandidateScore("L0.0", 0, 0, 0.5)
    score.by_set = {"a": {"abs_d": 2.0, "null": 1.0}, "b": {"abs_d": 0.5, "null": 1.0}}
    combined = combine_scores([score], "any")[0]
    assert combined.score == 2.0 and combined.passes
    with pytest.raises(CaftError, match="'all' or 'any'"):
        combine_scores([score], "most")


def test_methods_are_registered_and_unknown_names_fail():
    assert set(METHODS) == {
        "none",
        "caft_pca",
        "caft_sae",
        "random",
        "top_k",
        "random_orthonormal",
        "test_time_only",
        "fewer_steps",
    }
    with pytest.raises(CaftError, match=r"Unknown method 'pca'.*caft_pca"):
        get_method("pca")


def test_caft_sae_says_what_it_needs():
    context = SimpleNamespace(settings=ExperimentConfig(saes=[]))
    with pytest.raises(CaftError, match="caft_sae needs SAEs: list them under `saes:`"):
        run_caft_sae(context)


def test_sae_entries_are_sources_or_mappings():
    entries = check_sae_entries(["sae/a", {"source": "release", "sae_id": "layer_3/x", "layer": 3}])
    assert entries == [
        {"source": "sae/a", "sae_id": None, "layer": None},
        {"source": "release", "sae_id": "layer_3/x", "layer": 3},
    ]
    with pytest.raises(CaftError, match=r"saes\[0\]"):
        check_sae_entries([{"path": "sae/a"}])
