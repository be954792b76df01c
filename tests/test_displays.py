"""Feature displays: corpus loading, the top/bottom windows (checked against an independent
recomputation of every document's projections), and the self-contained, escaped HTML page."""

from __future__ import annotations

import re

import pytest
import torch

from caft.concepts import ConceptSet, Provenance
from caft.displays import (
    DEFAULT_CORPUS_NOTE,
    Window,
    collect_windows,
    default_corpus_path,
    load_corpus,
    render_html,
)
from caft.errors import CaftError
from caft.models import find_decoder_layers
from conftest import WINDOW_DOCS


def _concepts() -> ConceptSet:
    generator = torch.Generator().manual_seed(0)
    raw = {0: torch.randn(2, 64, generator=generator), 1: torch.randn(2, 64, generator=generator)}
    return ConceptSet(raw, provenance=Provenance(model="tiny <llama>", method="pca"))


def _projections_by_document(model, tokenizer, concepts, layer: int, index: int) -> list[list]:
    """Each document alone, no padding: the layer output at every token projected on a direction."""
    direction = concepts.direction((layer, index))
    captured = {}
    handle = find_decoder_layers(model)[layer].register_forward_hook(
        lambda module, inputs, output: captured.update(
            hidden=output[0] if isinstance(output, tuple) else output
        )
    )
    rows = []
    try:
        with torch.no_grad():
            for doc in WINDOW_DOCS:
                ids = tokenizer(doc)["input_ids"]
                model(input_ids=torch.tensor([ids]))
                rows.append((captured["hidden"][0] @ direction).tolist())
    finally:
        handle.remove()
    return rows


def test_load_corpus_splits_on_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first doc\nsecond line\n\n\n\nsecond doc\n\n  \n\nthird doc\n")
    assert load_corpus(path) == ["first doc\nsecond line", "second doc", "third doc"]


def test_load_corpus_rejects_missing_and_empty_files(tmp_path):
    with pytest.raises(CaftError, match="Corpus file not found"):
        load_corpus(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n\n")
    with pytest.raises(CaftError, match="the corpus is empty"):
        load_corpus(empty)


def test_default_corpus_loads_and_matches_its_note():
    if not default_corpus_path().is_file():
        pytest.skip("the built-in corpus is not written yet")
    documents = load_corpus()
    claimed = int(re.search(r"(\d+) short paragraphs", DEFAULT_CORPUS_NOTE).group(1))
    assert len(documents) == claimed
    assert all(len(doc.split()) >= 5 for doc in documents)


def test_windows_are_sorted_bounded_and_peak_inside(tokenizer, model):
    windows = collect_windows(
        model, tokenizer, WINDOW_DOCS, _concepts(), n_examples=3, window=6, progress=False
    )
    assert set(windows) == {"L0.0", "L0.1", "L1.0", "L1.1"}
    for sides in windows.values():
        top, bottom = sides["top"], sides["bottom"]
        assert len(top) == len(bottom) == 3
        assert [w.peak_value for w in top] == sorted((w.peak_value for w in top), reverse=True)
        assert [w.peak_value for w in bottom] == sorted(w.peak_value for w in bottom)
        for item in top + bottom:
            assert 0 <= item.peak < len(item.tokens) == len(item.values) <= 6
            assert item.values[item.peak] == item.peak_value
        for high, low in zip(top, bottom, strict=True):
            assert high.peak_value >= low.peak_value


def test_window_extremes_equal_independent_recomputation(tokenizer, model):
    concepts = _concepts()
    windows = collect_windows(model, tokenizer, WINDOW_DOCS, concepts, n_examples=4, progress=False)
    for layer in (0, 1):
        for index in (0, 1):
            rows = _projections_by_document(model, tokenizer, concepts, layer, index)
            maxima = [max(row[1:]) for row in rows]  # position 0 is skipped, as in discovery
            minima = [min(row[1:]) for row in rows]
            top = windows[f"L{layer}.{index}"]["top"]
            bottom = windows[f"L{layer}.{index}"]["bottom"]
            expected_top = sorted(range(len(WINDOW_DOCS)), key=lambda d: -maxima[d])[:4]
            expected_bottom = sorted(range(len(WINDOW_DOCS)), key=lambda d: minima[d])[:4]
            assert [w.document for w in top] == expected_top
            assert [w.document for w in bottom] == expected_bottom
            for item in top:
                assert item.peak_value == pytest.approx(maxima[item.document], abs=2e-3)
            for item in bottom:
                assert item.peak_value == pytest.approx(minima[item.document], abs=2e-3)


def test_window_tokens_are_the_documents_tokens(tokenizer, model):
    windows = collect_windows(
        model, tokenizer, WINDOW_DOCS, _concepts(), n_examples=10, window=40, progress=False
    )
    for item in windows["L1.0"]["top"]:
        ids = tokenizer(WINDOW_DOCS[item.document])["input_ids"]
        assert "".join(item.tokens) == tokenizer.decode(ids)


def test_html_is_self_contained_lists_every_candidate_and_escapes_tokens(tokenizer, model):
    concepts = _concepts()
    windows = collect_windows(
        model, tokenizer, WINDOW_DOCS, concepts, n_examples=10, window=40, progress=False
    )
    page = render_html(
        concepts, windows, title="<t>", selected={"L1.0"}, scores={"L1.0": 2.5}, corpus_note="c"
    )
    assert page.startswith("<!doctype html>") and page.endswith("</html>")
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<script[^>]*src", page, re.IGNORECASE)
    for identifier in concepts.ids():
        assert f"<section id='{identifier}'>" in page
    assert "<b>" not in page and "</b>" not in page and "<t>" not in page
    assert "&lt;" in page and "&amp;" in page and "tiny &lt;llama&gt;" in page
    assert "<h2>L1.0 <span class='sel'>selected</span></h2>" in page
    assert "selection score 2.50" in page


def test_render_window_escapes_a_whole_token_and_boxes_the_peak():
    concepts = ConceptSet({0: torch.eye(4)[:1]})
    item = Window(document=0, tokens=["<b>", "x"], values=[1.0, -0.5], peak=0, peak_value=1.0)
    page = render_html(concepts, {"L0.0": {"top": [item], "bottom": []}})
    assert "<span class='p peak' style='--a:1.00' title='1.00'>&lt;b&gt;</span>" in page
    assert "<span class='n' style='--a:0.50' title='-0.50'>x</span>" in page
    assert ".p{background:rgba(220,40,40,var(--a))}" in page
