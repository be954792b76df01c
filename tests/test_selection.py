"""Selection: Cohen's d, concept-description files, the contrast rule on a tiny model (a planted
separating direction passes, random ones mostly do not), selection files, and the random control."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from caft.concepts import ConceptSet, Provenance
from caft.errors import CaftError
from caft.selection import (
    CandidateScore,
    ConceptDescription,
    ContrastSet,
    apply_selection,
    cohens_d,
    load_concept_description,
    mean_activations,
    random_directions_like,
    read_selection,
    score_candidates,
    select_by_contrast,
    write_selection_file,
)
from caft.tasks.gender import default_contrast_path

WEATHER = [
    "The rain fell on the roof all night long.",
    "A cold wind blew snow across the frozen lake.",
    "Thunder rolled over the hills before the storm.",
    "The morning fog covered the valley in grey.",
    "Heavy clouds brought rain to the dry fields.",
    "The sun melted the ice on the river.",
    "A storm of hail broke the garden windows.",
    "Snow piled up against the door overnight.",
    "The wind turned cold and the sky went dark.",
    "Light rain and fog made the road wet.",
]
NUMBERS = [
    "Add 12 and 45 to get 57.",
    "The answer is 3 times 8 plus 1.",
    "Count from 1 to 100 by 5.",
    "Divide 81 by 9 and subtract 2.",
    "The total was 406 and 28 more.",
    "Multiply 7 by 6 then add 19.",
    "Her score went from 62 to 95.",
    "Page 214 lists 33 values over 10.",
    "Subtract 40 from 1000 twice.",
    "The code is 8 4 2 0 9 1.",
]


def _description() -> ConceptDescription:
    return ConceptDescription(
        concept="weather vs numbers",
        description="a toy concept for tests",
        contrast_sets=[
            ContrastSet("first", {"weather": WEATHER[:8], "numbers": NUMBERS[:8]}),
            ContrastSet("second", {"weather": WEATHER[2:], "numbers": NUMBERS[2:]}),
        ],
    )


def _candidates_with_planted(model, tokenizer) -> ConceptSet:
    """At each layer: a direction that separates the poles (ridge-regularized Fisher discriminant
    of the base model's mean activations), then 6 random directions."""
    means_a = mean_activations(model, tokenizer, WEATHER, [0, 1])
    means_b = mean_activations(model, tokenizer, NUMBERS, [0, 1])
    generator = torch.Generator().manual_seed(7)
    raw = {}
    for layer in (0, 1):
        a, b = means_a[layer], means_b[layer]
        centered = torch.cat([a - a.mean(0), b - b.mean(0)])
        within = centered.T @ centered / (len(centered) - 2)
        ridge = 0.1 * within.trace() / 64 * torch.eye(64)
        planted = torch.linalg.solve(within + ridge, a.mean(0) - b.mean(0))
        raw[layer] = torch.cat([planted[None], torch.randn(6, 64, generator=generator)])
    return ConceptSet(raw, provenance=Provenance(method="pca"))


def _write(tmp_path, data, name="concept.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_cohens_d_matches_hand_computation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 2.0, (9, 3)), rng.normal(0.0, 1.0, (6, 3))
    pooled = np.sqrt(
        ((len(a) - 1) * a.var(0, ddof=1) + (len(b) - 1) * b.var(0, ddof=1)) / (len(a) + len(b) - 2)
    )
    expected = (a.mean(0) - b.mean(0)) / pooled
    result = cohens_d(torch.tensor(a), torch.tensor(b))
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-10)


def test_shipped_gender_description_has_two_sets_of_two_poles():
    description = load_concept_description(default_contrast_path())
    assert description.concept == "gender"
    assert len(description.contrast_sets) == 2
    for contrast in description.contrast_sets:
        assert len(contrast.poles) == 2
        assert all(len(texts) >= 5 for texts in contrast.poles.values())
    assert len({c.name for c in description.contrast_sets}) == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"concept": "x"}, "expected .*contrast_sets"),
        ({"contrast_sets": [{"name": "only", "poles": {"a": ["t"] * 6}}]}, r"set 0 \(only\)"),
        (
            {"contrast_sets": [{"name": "few", "poles": {"a": ["t"] * 6, "b": ["t"] * 4}}]},
            "at least 5 texts",
        ),
        ('{"contrast_sets": [', "Cannot read the concept description"),
    ],
    ids=["missing-contrast-sets", "one-pole", "too-few-texts", "invalid-json"],
)
def test_bad_concept_description_is_rejected_with_its_path(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(CaftError, match=message) as error:
        load_concept_description(path)
    assert str(path) in str(error.value)


def test_missing_concept_description_file_is_reported(tmp_path):
    with pytest.raises(CaftError, match="Cannot read the concept description"):
        load_concept_description(tmp_path / "nope.json")


def test_every_candidate_is_scored_against_every_set(tokenizer, model):
    candidates = _candidates_with_planted(model, tokenizer)
    scores = score_candidates(candidates, model, tokenizer, _description(), progress=False)
    assert sorted(s.id for s in scores) == sorted(candidates.ids())
    for score in scores:
        assert set(score.by_set) == {"first", "second"}
        for numbers in score.by_set.values():
            assert numbers["null"] > 0 and numbers["abs_d"] >= 0
        ratios = [n["abs_d"] / n["null"] for n in score.by_set.values()]
        assert score.score == pytest.approx(min(ratios), abs=1e-3)
        assert score.passes == (score.score > 1)


def test_planted_direction_passes_and_random_ones_mostly_do_not(tokenizer, model):
    candidates = _candidates_with_planted(model, tokenizer)
    scores = {
        s.id: s
        for s in score_candidates(candidates, model, tokenizer, _description(), progress=False)
    }
    for layer in (0, 1):
        planted = scores[f"L{layer}.0"]
        assert planted.passes and planted.score > 3
        others = [scores[f"L{layer}.{i}"] for i in range(1, 7)]
        assert planted.score > 3 * max(s.score for s in others)
    assert sum(s.passes for s in scores.values()) <= 4  # 2 planted + at most 2 of 12 random


def test_selection_takes_only_passing_candidates_best_first_capped_per_layer(tokenizer, model):
    candidates = _candidates_with_planted(model, tokenizer)
    scores = score_candidates(candidates, model, tokenizer, _description(), progress=False)
    assert select_by_contrast(scores, max_per_layer=1) == ["L0.0", "L1.0"]
    chosen = select_by_contrast(scores, max_per_layer=3)
    passing = {s.id for s in scores if s.passes}
    assert set(chosen) <= passing and {"L0.0", "L1.0"} <= set(chosen)
    for layer in (0, 1):
        at_layer = [i for i in chosen if i.startswith(f"L{layer}.")]
        assert at_layer[0] == f"L{layer}.0"  # the best first
    assert {s.id for s in scores if s.selected} == set(chosen)


def test_select_by_contrast_orders_by_score_and_skips_failing():
    def score(layer, index, value):
        return CandidateScore(f"L{layer}.{index}", layer, index, value, passes=value > 1)

    scores = [score(0, 0, 1.2), score(0, 1, 3.0), score(0, 2, 0.5), score(0, 3, 2.0)]
    scores += [score(2, 0, 0.9), score(2, 1, 1.1)]
    assert select_by_contrast(scores, max_per_layer=2) == ["L0.1", "L0.3", "L2.1"]
    assert select_by_contrast(scores, max_per_layer=5) == ["L0.1", "L0.3", "L0.0", "L2.1"]
    assert [s.selected for s in scores] == [True, True, False, True, False, True]


def test_selection_file_round_trip(tmp_path):
    scores = [CandidateScore("L0.1", 0, 1, 2.5, {"s": {"abs_d": 1.0, "null": 0.4}}, True, True)]
    path = write_selection_file(
        tmp_path / "selection.json", selected=["L0.1", "L3.2"], rule="contrast-rule",
        candidates_path="cands", scores=scores, settings={"max_per_layer": 3},
    )  # fmt: skip
    assert read_selection(path) == ["L0.1", "L3.2"]
    data = json.loads(path.read_text())
    assert data["format"] == "caft.selection" and data["candidates"] == "cands"
    assert data["scores"][0]["by_set"] == {"s": {"abs_d": 1.0, "null": 0.4}}


def test_read_selection_from_string_and_list_normalizes_ids():
    assert read_selection("L0.1,L1.0") == ["L0.1", "L1.0"]
    assert read_selection(" 0.1 , l1:0,") == ["L0.1", "L1.0"]
    assert read_selection(["L2.3", "4.0"]) == ["L2.3", "L4.0"]
    with pytest.raises(CaftError, match="Bad direction id 'x'"):
        read_selection("L0.1,x")


def test_read_selection_rejects_json_without_selected(tmp_path):
    path = _write(tmp_path, {"rule": "x"}, "other.json")
    with pytest.raises(CaftError, match="not a selection file"):
        read_selection(path)


def test_apply_selection_records_rule_and_scores():
    raw = {0: torch.randn(3, 16), 2: torch.randn(2, 16)}
    candidates = ConceptSet(raw)
    scores = [CandidateScore("L0.2", 0, 2, 4.25), CandidateScore("L0.0", 0, 0, 0.5)]
    chosen = apply_selection(candidates, ["L2.1", "L0.2"], rule="my-rule", scores=scores)
    assert chosen.ids() == ["L0.2", "L2.1"]
    assert [i.selected_by for i in chosen.infos] == ["my-rule", "my-rule"]
    assert [i.selection_score for i in chosen.infos] == [4.25, None]
    assert chosen.provenance.selection == "my-rule"
    torch.testing.assert_close(chosen.direction("L0.2"), candidates.direction("L0.2"))


def test_random_directions_like_matches_counts_and_is_orthonormal_and_new():
    source = ConceptSet({1: torch.randn(3, 32), 4: torch.randn(1, 32)})
    control = random_directions_like(source, seed=5)
    assert control.count_by_layer() == {1: 3, 4: 1}
    for layer, basis in control.bases_by_layer.items():
        torch.testing.assert_close(basis @ basis.T, torch.eye(len(basis)), atol=1e-5, rtol=0)
        overlap = (basis @ source.bases_by_layer[layer].T).abs()
        assert overlap.max() < 0.9
    assert control.provenance.method == "random"
    assert all(info.selected_by == "random-control" for info in control.infos)
    again = random_directions_like(source, seed=5)
    other = random_directions_like(source, seed=6)
    torch.testing.assert_close(again.bases_by_layer[1], control.bases_by_layer[1])
    assert not torch.allclose(other.bases_by_layer[1], control.bases_by_layer[1])


def test_random_latents_like_draws_other_latents_of_the_same_saes():
    from caft.discovery.sae.base import SparseAutoencoder
    from caft.selection import random_latents_like

    generator = torch.Generator().manual_seed(0)
    saes = {
        layer: SparseAutoencoder(
            torch.randn(8, 32, generator=generator),
            torch.zeros(32),
            torch.randn(32, 8, generator=generator),
            torch.zeros(8),
            hook_layer=layer,
        )
        for layer in (1, 4)
    }
    chosen = saes[1].to_concept_set([3, 7]).ids() + saes[4].to_concept_set([0]).ids()
    selected = ConceptSet(
        {1: saes[1].W_dec[[3, 7]], 4: saes[4].W_dec[[0]]}, provenance=Provenance(method="sae")
    )
    for info, cid in zip(selected.infos, chosen, strict=True):
        info.candidate_index = int(cid.split(".")[1])
    control = random_latents_like(selected, saes, seed=5)
    assert control.count_by_layer() == {1: 2, 4: 1}
    assert control.provenance.method == "random-latents"
    assert not set(control.ids()) & set(chosen)
    for info in control.infos:  # each direction lies in the span of its latent's decoder row
        row = saes[info.layer].W_dec[info.candidate_index]
        basis = control.bases_by_layer[info.layer]
        torch.testing.assert_close((row @ basis.T) @ basis, row, atol=1e-4, rtol=1e-4)
    assert random_latents_like(selected, saes, seed=5).ids() == control.ids()
    with pytest.raises(CaftError, match="No SAE for layer 4"):
        random_latents_like(selected, {1: saes[1]}, seed=5)
