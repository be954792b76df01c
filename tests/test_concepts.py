"""ConceptSet: orthonormal bases built from raw directions, validation, ids, subsets, persistence.

The properties checked are the ones ablation relies on: rows are orthonormal and span exactly the
directions given (so `h - (hQ)Qᵀ` removes what the user asked for, no more, no less), signs are
kept, and bad input is rejected with a message that says which layer and what is wrong.
"""

from __future__ import annotations

import json

import pytest
import torch

import caft
from caft.concepts import (
    SIDECAR_FILE,
    TENSORS_FILE,
    ConceptSet,
    DirectionInfo,
    Provenance,
    parse_direction_id,
)
from caft.errors import CaftError

WIDTH = 64


def _raw_correlated(k: int = 3, seed: int = 0) -> torch.Tensor:
    """k directions that are far from orthogonal and not unit length."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(WIDTH, generator=generator)
    noise = torch.randn(k, WIDTH, generator=generator)
    return 3.0 * base + 0.5 * noise


def test_rows_are_orthonormal_and_span_the_raw_directions():
    raw = _raw_correlated()
    assert (raw @ raw.T).abs().min() > 1.0  # genuinely non-orthogonal input
    basis = ConceptSet({2: raw}).bases_by_layer[2]
    assert basis.shape == (3, WIDTH)
    assert basis.dtype == torch.float32
    torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-5, rtol=0)
    reconstructed = (raw @ basis.T) @ basis
    torch.testing.assert_close(reconstructed, raw, atol=1e-4, rtol=1e-5)


def test_first_row_is_the_first_direction_normalised_and_signs_are_kept():
    raw = _raw_correlated()
    basis = ConceptSet({0: raw}).bases_by_layer[0]
    torch.testing.assert_close(basis[0], raw[0] / raw[0].norm(), atol=1e-6, rtol=0)
    assert ((basis * raw).sum(-1) > 0).all()
    flipped = ConceptSet({0: -raw}).bases_by_layer[0]
    torch.testing.assert_close(flipped, -basis, atol=1e-6, rtol=0)


def test_a_single_1d_direction_is_accepted():
    vector = torch.randn(WIDTH)
    concepts = ConceptSet({1: vector})
    assert len(concepts) == 1
    torch.testing.assert_close(concepts.direction("L1.0"), vector / vector.norm())


@pytest.mark.parametrize("kind", ["duplicate", "zero", "combination"])
def test_rank_deficient_directions_are_rejected(kind):
    raw = _raw_correlated(2)
    extra = {
        "duplicate": raw[0],
        "zero": torch.zeros(WIDTH),
        "combination": 2.0 * raw[0] - 0.5 * raw[1],
    }[kind]
    with pytest.raises(CaftError) as error:
        ConceptSet({4: torch.cat([raw, extra[None]])})
    message = str(error.value)
    assert "layer 4" in message
    assert "rank-deficient" in message


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_directions_are_rejected(bad):
    raw = _raw_correlated(2)
    raw[1, 5] = bad
    with pytest.raises(CaftError, match="layer 3: directions contain NaN or infinite values"):
        ConceptSet({0: torch.randn(1, WIDTH), 3: raw})


def test_more_directions_than_the_width_are_rejected():
    with pytest.raises(CaftError, match="5 directions exceed the width 4"):
        ConceptSet({0: torch.randn(5, 4)})


def test_layers_of_different_widths_are_rejected():
    with pytest.raises(CaftError, match=r"same width; got \[32, 64\]"):
        ConceptSet({0: torch.randn(1, 64), 1: torch.randn(1, 32)})


def test_empty_input_is_rejected():
    with pytest.raises(CaftError, match="at least one layer"):
        ConceptSet({})


def test_infos_must_match_the_direction_counts():
    infos = [DirectionInfo(layer=0, candidate_index=0)]
    with pytest.raises(CaftError, match="Layer 0 has 2 directions but 1 records"):
        ConceptSet({0: torch.randn(2, WIDTH)}, infos=infos)


def test_provenance_records_caft_version_and_creation_time():
    concepts = ConceptSet({0: torch.randn(1, WIDTH)}, provenance=Provenance(method="manual"))
    assert concepts.provenance.caft_version == caft.__version__
    assert concepts.provenance.created_at[:2] == "20"
    assert "T" in concepts.provenance.created_at
    assert concepts.provenance.method == "manual"


def _candidates() -> ConceptSet:
    torch.manual_seed(0)
    infos = [
        DirectionInfo(layer=1, candidate_index=i, score=0.5 - 0.1 * i, note=f"pc{i}")
        for i in range(3)
    ] + [DirectionInfo(layer=3, candidate_index=i, score=0.2) for i in range(2)]
    provenance = Provenance(model="tiny", method="pca", data="prompts", extra={"k": 3})
    return ConceptSet(
        {1: torch.randn(3, WIDTH), 3: torch.randn(2, WIDTH)}, provenance=provenance, infos=infos
    )


def test_save_and_load_round_trip_is_exact(tmp_path):
    concepts = _candidates()
    folder = concepts.save(tmp_path / "set")
    assert (folder / TENSORS_FILE).is_file() and (folder / SIDECAR_FILE).is_file()
    loaded = ConceptSet.load(folder)
    assert loaded.layers == concepts.layers == [1, 3]
    for layer in concepts.layers:
        assert torch.equal(loaded.bases_by_layer[layer], concepts.bases_by_layer[layer])
    assert loaded.d_model == WIDTH
    assert loaded.provenance == concepts.provenance
    assert loaded.infos == concepts.infos
    assert loaded.ids() == ["L1.0", "L1.1", "L1.2", "L3.0", "L3.1"]


def test_saving_over_an_existing_set_replaces_it(tmp_path):
    _candidates().save(tmp_path / "set")
    smaller = ConceptSet({0: torch.randn(1, WIDTH)})
    smaller.save(tmp_path / "set")
    assert ConceptSet.load(tmp_path / "set").ids() == ["L0.0"]


def test_subset_by_ids_keeps_those_directions_and_their_records():
    concepts = _candidates()
    chosen = concepts.subset(["L3.1", "L1.0", (1, 2)], selection="human")
    assert chosen.ids() == ["L1.0", "L1.2", "L3.1"]
    assert chosen.count_by_layer() == {1: 2, 3: 1}
    assert [info.note for info in chosen.infos_at(1)] == ["pc0", "pc2"]
    assert chosen.provenance.selection == "human"
    assert chosen.provenance.model == "tiny"
    torch.testing.assert_close(chosen.direction("L3.1"), concepts.direction("L3.1"))
    basis = chosen.bases_by_layer[1]
    torch.testing.assert_close(basis @ basis.T, torch.eye(2), atol=1e-5, rtol=0)
    span = torch.stack([concepts.direction("L1.0"), concepts.direction("L1.2")])
    torch.testing.assert_close((span @ basis.T) @ basis, span, atol=1e-5, rtol=0)


def test_subset_with_an_unknown_id_lists_the_available_ones():
    with pytest.raises(CaftError) as error:
        _candidates().subset(["L1.0", "L2.7"])
    message = str(error.value)
    assert "Unknown direction(s) L2.7" in message
    assert "L1.0, L1.1, L1.2, L3.0, L3.1" in message


def test_empty_subset_is_rejected():
    with pytest.raises(CaftError, match="empty selection"):
        _candidates().subset([])


def test_direction_lookup_with_an_unknown_id_lists_the_available_ones():
    with pytest.raises(CaftError, match=r"No direction L3\.5 .*L1\.0"):
        _candidates().direction("L3.5")


@pytest.mark.parametrize("text", ["L3.0", "l3.0", "3.0", "3:0", " L3:0 "])
def test_parse_direction_id_accepts_the_usual_spellings(text):
    assert parse_direction_id(text) == (3, 0)


@pytest.mark.parametrize("text", ["x", "L3", "L3.0.1", "La.b", ""])
def test_parse_direction_id_rejects_malformed_ids(text):
    with pytest.raises(CaftError, match="Bad direction id"):
        parse_direction_id(text)


def test_check_compatible_reports_a_width_mismatch(model):
    concepts = ConceptSet({0: torch.randn(1, 32)}, provenance=Provenance(model="other-model"))
    with pytest.raises(CaftError) as error:
        concepts.check_compatible(model)
    message = str(error.value)
    assert "width 32" in message and "hidden size is 64" in message
    assert "other-model" in message


def test_check_compatible_reports_a_missing_layer(model):
    concepts = ConceptSet({1: torch.randn(1, WIDTH), 5: torch.randn(1, WIDTH)})
    with pytest.raises(CaftError, match=r"layer\(s\) \[5\].*2 decoder layers \(0\.\.1\)"):
        concepts.check_compatible(model)


def test_check_compatible_accepts_a_fitting_set(model):
    ConceptSet({0: torch.randn(2, WIDTH), 1: torch.randn(1, WIDTH)}).check_compatible(model)


def test_loading_a_folder_that_is_not_a_concept_set_fails_clearly(tmp_path):
    with pytest.raises(CaftError, match=r"is not a caft concept set: expected concepts\.json"):
        ConceptSet.load(tmp_path)


def test_loading_a_set_with_a_broken_sidecar_fails_clearly(tmp_path):
    folder = _candidates().save(tmp_path / "set")
    (folder / SIDECAR_FILE).write_text("{not json")
    with pytest.raises(CaftError, match=r"concepts\.json: invalid JSON"):
        ConceptSet.load(folder)
    (folder / SIDECAR_FILE).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CaftError, match=r"not a caft\.ConceptSet sidecar"):
        ConceptSet.load(folder)


def test_loading_a_set_with_non_finite_tensors_fails_clearly(tmp_path):
    from safetensors.torch import save_file

    folder = _candidates().save(tmp_path / "set")
    broken = torch.full((2, WIDTH), float("nan"))
    save_file({"layer.1": torch.randn(3, WIDTH), "layer.3": broken}, str(folder / TENSORS_FILE))
    with pytest.raises(CaftError, match="layer 3: directions contain NaN or infinite values"):
        ConceptSet.load(folder)


def test_artifacts_get_the_usual_file_modes(tmp_path):
    import os
    import stat

    from caft.io import atomic_write_text

    path = atomic_write_text(tmp_path / "report.md", "hello")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    folder = caft.ConceptSet({0: torch.eye(2, 8)}).save(tmp_path / "set")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
