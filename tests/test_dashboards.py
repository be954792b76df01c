"""Feature dashboards: the batched top-k windows agree with the heap-based displays and with an
independent per-document recomputation (PC projections and SAE latent activations), the streaming
histogram equals a histogram over the final range, logit effects equal a hand product with the final
norm's scale, and the page has an index, one card per candidate, SVG histograms and no external
assets."""

from __future__ import annotations

import html

import pytest
import torch

from caft.concepts import ConceptSet, Provenance
from caft.dashboards import (
    _Histograms,
    build_dashboard,
    collect_feature_stats,
    features_from,
    final_norm_scale,
    histogram_svg,
    logit_effects,
    render_dashboard,
)
from caft.discovery.sae import SparseAutoencoder
from caft.displays import collect_windows
from caft.errors import CaftError
from caft.models import find_decoder_layers
from conftest import WINDOW_DOCS


def _pcs() -> ConceptSet:
    generator = torch.Generator().manual_seed(0)
    raw = {0: torch.randn(3, 64, generator=generator), 1: torch.randn(2, 64, generator=generator)}
    return ConceptSet(raw, provenance=Provenance(model="tiny <llama>", method="pca", data="d"))


def _sae(layer: int = 1, width: int = 40) -> SparseAutoencoder:
    """Random, with latents firing on 1-50% of the tiny model's tokens."""
    generator = torch.Generator().manual_seed(3)
    return SparseAutoencoder(
        torch.randn(64, width, generator=generator) * 0.5,
        torch.randn(width, generator=generator) * 0.05 - 0.15,
        torch.randn(width, 64, generator=generator),
        torch.randn(64, generator=generator) * 0.01,
        hook_layer=layer,
    )


def _outputs_by_document(model, tokenizer, layer: int) -> list[torch.Tensor]:
    """Each document alone, no padding: the layer output at every token [T, d]."""
    captured, rows = {}, []
    handle = find_decoder_layers(model)[layer].register_forward_hook(
        lambda module, inputs, output: captured.update(
            h=output[0] if isinstance(output, tuple) else output
        )
    )
    try:
        with torch.no_grad():
            for doc in WINDOW_DOCS:
                model(input_ids=torch.tensor([tokenizer(doc)["input_ids"]]))
                rows.append(captured["h"][0])
    finally:
        handle.remove()
    return rows


def test_pc_windows_match_the_heap_displays_and_a_recomputation(tokenizer, model):
    concepts = _pcs()
    stats = collect_feature_stats(
        model, tokenizer, WINDOW_DOCS, features_from(concepts), n_examples=4, window=8, batch_size=3,
        progress=False,
    )  # fmt: skip
    heaps = collect_windows(
        model, tokenizer, WINDOW_DOCS, concepts, n_examples=4, window=8, progress=False
    )
    for identifier in concepts.ids():
        for side in ("top", "bottom"):
            mine, theirs = getattr(stats[identifier], side), heaps[identifier][side]
            assert [w.document for w in mine] == [w.document for w in theirs]
            assert [w.tokens for w in mine] == [w.tokens for w in theirs]
            for a, b in zip(mine, theirs, strict=True):
                assert a.peak == b.peak and a.peak_value == pytest.approx(b.peak_value, abs=2e-3)
    direction = concepts.direction("L1.1")
    values = [(h @ direction)[1:] for h in _outputs_by_document(model, tokenizer, 1)]
    every = torch.cat(values)
    stat = stats["L1.1"]
    assert stat.n_tokens == every.numel() and stat.n_zero == 0
    assert stat.max == pytest.approx(every.max().item(), abs=1e-4)
    assert stat.min == pytest.approx(every.min().item(), abs=1e-4)
    assert stat.mean == pytest.approx(every.mean().item(), abs=1e-4)
    assert sum(stat.histogram) == every.numel()


def test_sae_latent_windows_are_latent_activations_where_active(tokenizer, model):
    sae = _sae()
    concepts = sae.to_concept_set([5, 0, 33, 12])
    stats = collect_feature_stats(
        model, tokenizer, WINDOW_DOCS, features_from(concepts, {1: sae}), n_examples=3, batch_size=4,
        progress=False,
    )  # fmt: skip
    outputs = _outputs_by_document(model, tokenizer, 1)
    for latent in (5, 0, 33, 12):
        acts = [sae.encode(h)[1:, latent] for h in outputs]  # position 0 is not scored
        maxima = [a.max().item() for a in acts]
        active = [
            d for d in sorted(range(len(WINDOW_DOCS)), key=lambda d: -maxima[d]) if maxima[d] > 0
        ]
        stat = stats[f"L1.{latent}"]
        assert [w.document for w in stat.top] == active[:3] and active
        assert stat.bottom == []
        for window in stat.top:
            assert window.peak_value == pytest.approx(maxima[window.document], abs=2e-3)
            assert window.values[window.peak] == max(v for v in window.values if v == v)
        every = torch.cat(acts)
        assert stat.n_zero == int((every == 0).sum()) and stat.n_tokens == every.numel()
        assert sum(stat.histogram) == int((every != 0).sum())
    assert len(stats["L1.33"].top) < 3  # a latent active in fewer documents shows only those


def test_streaming_histogram_equals_histogram_over_the_final_range():
    generator = torch.Generator().manual_seed(1)
    chunks = [torch.randn(50, 3, generator=generator) * scale for scale in (0.1, 1.0, 0.5, 9.0)]
    chunks[1][:7, 0] = 0.0  # exact zeros are counted apart
    histograms = _Histograms(3, half_bins=8)
    for chunk in chunks:
        histograms.update(chunk)
    values = torch.cat(chunks).double()
    first_radius = chunks[0].abs().amax(0).double()
    assert torch.all(histograms.radius >= values.abs().amax(0))
    assert torch.all(histograms.radius < 2 * values.abs().amax(0))
    ratio = torch.log2(histograms.radius / first_radius)
    torch.testing.assert_close(ratio, ratio.round())  # the first radius, doubled
    for j in range(3):
        radius = histograms.radius[j]
        column = values[:, j][values[:, j] != 0]
        index = ((column + radius) / (2 * radius / 16)).floor().long().clamp(0, 15)
        assert histograms.counts[j].tolist() == torch.bincount(index, minlength=16).tolist()
    assert histograms.zeros.tolist() == [7, 0, 0]


def test_logit_effects_are_direction_times_norm_scale_through_unembedding(tokenizer, model):
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.rand(64, generator=torch.Generator().manual_seed(4)))
    _, note = final_norm_scale(model)
    assert note == "model.norm.weight"
    directions = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    effects, _ = logit_effects(model, tokenizer, directions, top=4)
    expected = (directions * model.model.norm.weight) @ model.lm_head.weight.T
    for row, effect in zip(expected, effects, strict=True):
        top = row.topk(4)
        bottom = row.topk(4, largest=False)
        assert [t for t, _ in effect.positive] == [tokenizer.decode([i]) for i in top.indices]
        assert [t for t, _ in effect.negative] == [tokenizer.decode([i]) for i in bottom.indices]
        assert [v for _, v in effect.positive] == pytest.approx(top.values.tolist(), abs=1e-3)


def test_gemma_final_norm_scale_is_one_plus_weight():
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
    )  # fmt: skip
    gemma = GemmaForCausalLM(config)
    with torch.no_grad():
        gemma.model.norm.weight.fill_(0.25)
    scale, note = final_norm_scale(gemma)
    assert "Gemma" in note
    torch.testing.assert_close(scale, torch.full((16,), 1.25))


def test_page_has_index_cards_histograms_and_logit_effects(tokenizer, model):
    sae = _sae()
    latents = [5, 0, 33, 12]
    concepts = sae.to_concept_set(latents, scores=[0.4, 0.3, 0.2, 0.1])
    dashboard = build_dashboard(
        model, tokenizer, WINDOW_DOCS, concepts, saes={1: sae}, corpus_note="ten <docs>",
        n_examples=3, progress=False,
    )  # fmt: skip
    extra = {"L1.5": {"attribution": 1.5, "mean_diff": -0.25}}
    page = render_dashboard(dashboard, title="t <1>", selected={"L1.0"}, extra_scores=extra)
    assert page.startswith("<!doctype html>") and page.endswith("</html>")
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "<th>attribution</th><th>mean_diff</th>" in page
    for latent in latents:
        assert f"<a href='#L1.{latent}'>L1.{latent}</a>" in page
        assert f"<section id='L1.{latent}'>" in page
    assert page.count("<tr><td><a href=") == 4
    active = [i for i in concepts.ids() if any(dashboard.stats[i].histogram)]
    assert page.count("<svg class='hist'") == len(active) >= 1
    assert page.count("<table class='eff'>") == 4
    first_raised = dashboard.effects["L1.5"].positive[0][0]
    assert html.escape(first_raised).replace("\n", "⏎") in page
    assert "<h2>L1.0 <span class='sel'>selected</span></h2>" in page
    assert "most negative" not in page and "top activations" in page
    assert "t &lt;1&gt;" in page and "ten &lt;docs&gt;" in page
    assert "SAE latent's activation" in page
    # the direction logit effects use the raw decoder row, unit-normalised
    row = sae.W_dec[5] / sae.W_dec[5].norm()
    effects, _ = logit_effects(model, tokenizer, row[None], top=1)
    assert dashboard.effects["L1.5"].positive[0] == effects[0].positive[0]


def test_pca_candidates_render_with_both_ends(tokenizer, model):
    concepts = _pcs()
    dashboard = build_dashboard(
        model, tokenizer, WINDOW_DOCS, concepts, n_examples=2, progress=False
    )
    page = render_dashboard(dashboard)
    for identifier in concepts.ids():
        assert f"<section id='{identifier}'>" in page
    assert page.count("<h3>most negative</h3>") == len(concepts) == page.count("<svg class='hist'")
    assert "projection of the layer output" in page


def test_histogram_svg_trims_empty_bins_and_marks_zero():
    svg = histogram_svg([0, 0, 3, 1, 0, 2, 0, 0], -4.0, 4.0)
    assert svg.startswith("<svg class='hist'") and svg.count("V") == 5  # 3 bins + 2 closing
    assert ">-2<" in svg and ">2<" in svg and ">3<" in svg and "class='z'" in svg
    assert "no nonzero values" in histogram_svg([0, 0], -1.0, 1.0)


def test_token_labels_keep_tables_narrow():
    from caft.dashboards import _token_label

    assert _token_label("a\n\tb<") == "a⏎⇥b&lt;"
    assert _token_label("  x" + " " * 16) == "  x␣×16"


def test_sae_candidates_need_their_sae(tokenizer, model):
    concepts = _sae().to_concept_set([1, 2])
    with pytest.raises(CaftError, match="no SAE for it"):
        features_from(concepts, {0: _sae(layer=0)})
    with pytest.raises(CaftError, match="do not exist"):
        features_from(concepts, {1: _sae(width=2)})
