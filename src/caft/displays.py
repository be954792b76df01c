"""Feature displays: for each candidate direction, the corpus windows that project most and least on it.

The base model reads a generic corpus; each direction's projection of every token's layer output is
tracked, keeping the top-N documents by their maximum and the bottom-N by their minimum (a PC's sign
is arbitrary, so both ends matter). Each kept example is a window of tokens around the extreme one,
with every token's value, rendered as shaded text in one self-contained HTML file.
"""

from __future__ import annotations

import heapq
import html
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from caft.activations import iterate_layer_outputs
from caft.concepts import ConceptSet
from caft.errors import CaftError
from caft.io import atomic_write_text

DEFAULT_CORPUS_NOTE = (
    "caft's built-in generic corpus: 220 short paragraphs on varied everyday topics, written for "
    "caft (public domain)."
)


@dataclass
class Window:
    document: int
    tokens: list[str]
    values: list[float]
    peak: int  # index of the extreme token in `tokens`
    peak_value: float


def default_corpus_path() -> Path:
    return Path(str(resources.files("caft") / "data" / "generic_corpus.txt"))


def load_corpus(path: str | Path | None = None) -> list[str]:
    """Documents from a text file: paragraphs separated by blank lines (the built-in one if None)."""
    path = Path(path) if path is not None else default_corpus_path()
    if not path.is_file():
        raise CaftError(f"Corpus file not found: {path}")
    documents = [block.strip() for block in path.read_text(encoding="utf-8").split("\n\n")]
    documents = [d for d in documents if d]
    if not documents:
        raise CaftError(f"{path}: the corpus is empty (documents are separated by blank lines).")
    return documents


@torch.no_grad()
def collect_windows(
    model,
    tokenizer,
    documents: list[str],
    concepts: ConceptSet,
    *,
    n_examples: int = 20,
    window: int = 12,
    max_tokens: int = 128,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, dict[str, list[Window]]]:
    """{direction id: {"top": [...], "bottom": [...]}}, best first, streaming over the corpus."""
    token_lists = [tokenizer(doc)["input_ids"][:max_tokens] for doc in documents]
    heaps: dict[tuple[str, str], list] = {}
    infos_by_layer = {layer: concepts.infos_at(layer) for layer in concepts.layers}
    stream = iterate_layer_outputs(
        model, token_lists, concepts.layers, pad_id=tokenizer.pad_token_id, batch_size=batch_size
    )
    n_batches = (len(token_lists) + batch_size - 1) // batch_size
    for outputs, mask, rows in tqdm(stream, total=n_batches, desc="displays", disable=not progress):
        for layer, infos in infos_by_layer.items():
            basis = concepts.bases_by_layer[layer].to(outputs[layer].device)
            projections = (outputs[layer].float() @ basis.T).cpu()  # [B, T, k]
            _update_heaps(heaps, projections, mask.cpu(), rows, infos, token_lists, n_examples)
    return _windows_from_heaps(heaps, concepts, token_lists, tokenizer, window)


def _update_heaps(heaps, projections, mask, rows, infos, token_lists, n_examples) -> None:
    big = torch.finfo(projections.dtype).max
    maxima = projections.masked_fill(~mask[..., None], -big).max(1)
    minima = projections.masked_fill(~mask[..., None], big).min(1)
    pad = mask.shape[1]
    for b, document in enumerate(rows):
        offset = pad - len(token_lists[document])  # left padding
        for j, info in enumerate(infos):
            for side, found, sign in (("top", maxima, 1.0), ("bottom", minima, -1.0)):
                value = found.values[b, j].item()
                if abs(value) == big:
                    continue
                position = found.indices[b, j].item()
                item = (
                    sign * value,
                    document,
                    position - offset,
                    projections[b, offset:, j].tolist(),
                )
                heap = heaps.setdefault((info.id, side), [])
                if len(heap) < n_examples:
                    heapq.heappush(heap, item)
                elif item[0] > heap[0][0]:
                    heapq.heapreplace(heap, item)


def _windows_from_heaps(heaps, concepts, token_lists, tokenizer, window) -> dict:
    result: dict[str, dict[str, list[Window]]] = {}
    for info in concepts.infos:
        result[info.id] = {}
        for side in ("top", "bottom"):
            items = sorted(heaps.get((info.id, side), []), reverse=True)
            result[info.id][side] = [
                make_window(document, peak, values, token_lists[document], tokenizer, window)
                for _, document, peak, values in items
            ]
    return result


def make_window(document: int, peak: int, values, token_ids, tokenizer, window: int = 12) -> Window:
    """The `window` tokens around position `peak` of a document (two thirds of them before it),
    with their values; `values` and `token_ids` are the whole document's."""
    start = max(0, peak - window * 2 // 3)
    stop = min(len(values), start + window)
    ids = token_ids[start:stop]
    return Window(
        document=document,
        tokens=[tokenizer.decode([i]) for i in ids],
        values=[round(float(v), 3) for v in values[start:stop]],
        peak=peak - start,
        peak_value=round(float(values[peak]), 3),
    )


def render_html(
    concepts: ConceptSet,
    windows: dict[str, dict[str, list[Window]]],
    *,
    title: str = "caft candidate directions",
    corpus_note: str = "",
    selected: set[str] | None = None,
    scores: dict[str, float] | None = None,
) -> str:
    """One self-contained HTML page: every candidate with its top and bottom windows, shaded."""
    selected = selected or set()
    scores = scores or {}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{DISPLAY_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='meta'>model: {html.escape(concepts.provenance.model)} · method: "
        f"{html.escape(concepts.provenance.method)} · data: {html.escape(concepts.provenance.data)}"
        f"<br>corpus: {html.escape(corpus_note)}<br>red = positive projection, blue = negative; "
        "the extreme token is boxed.</p>",
    ]
    for info in concepts.infos:
        flag = " <span class='sel'>selected</span>" if info.id in selected else ""
        extra = (
            f" · selection score {scores[info.id]:.2f}" if scores.get(info.id) is not None else ""
        )
        score = f"{info.score:.4f}" if info.score is not None else "–"
        parts.append(f"<section id='{info.id}'><h2>{info.id}{flag}</h2>")
        parts.append(f"<p class='meta'>discovery score {score}{extra}</p>")
        for side, label in (("top", "most positive"), ("bottom", "most negative")):
            parts.append(f"<h3>{label}</h3><ol>")
            for item in windows.get(info.id, {}).get(side, []):
                parts.append(f"<li>{render_window(item)}</li>")
            parts.append("</ol>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "".join(parts)


def render_window(item: Window) -> str:
    """A window as shaded spans (red positive, blue negative, the peak boxed) and its peak value.

    A NaN value marks a token that was not scored (e.g. the attention sink): shown unshaded.
    """
    scale = max((abs(v) for v in item.values if v == v), default=1.0) or 1.0
    spans = []
    for i, (token, value) in enumerate(zip(item.tokens, item.values, strict=True)):
        text = html.escape(token).replace("\n", "⏎")
        if value != value:  # NaN
            spans.append(f"<span title='not scored'>{text}</span>")
            continue
        # Short markup (a class for the sign, a CSS variable for the strength): pages with
        # hundreds of candidates stay a few MB.
        alpha = min(1.0, abs(value) / scale)
        classes = ("p" if value > 0 else "n") + (" peak" if i == item.peak else "")
        spans.append(
            f"<span class='{classes}' style='--a:{alpha:.2f}' title='{value:.2f}'>{text}</span>"
        )
    return (
        f"<span class='win'>{''.join(spans)}</span> <span class='val'>{item.peak_value:+.2f}</span>"
    )


def write_html(path: str | Path, page: str) -> Path:
    return atomic_write_text(path, page)


DISPLAY_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}
section{border-top:1px solid #ccc;padding-top:.5em}
.meta{color:#555;font-size:.9em}.sel{background:#2a2;color:#fff;padding:0 .4em;border-radius:3px}
.win{font-family:ui-monospace,monospace;white-space:pre}.peak{outline:1px solid #000}
.p{background:rgba(220,40,40,var(--a))}.n{background:rgba(40,90,220,var(--a))}
.val{color:#777;font-size:.85em}ol{margin:.2em 0}li{margin:.1em 0}
"""
