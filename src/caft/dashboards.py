"""Feature dashboards: one self-contained HTML page with a card for every candidate direction.

The same code serves SAE latents and PCA (or any ConceptSet) directions. A candidate's *value* at a
token is its SAE latent activation (`encode`, with the SAE given) or the projection of the layer
output on the direction (anything else). One pass of the model over a corpus collects, for every
candidate at once:

- the top documents by their maximum value (and, for signed candidates such as PCs, whose sign is
  arbitrary, the bottom documents by their minimum), as token windows shaded by value — the same
  windows as `caft.displays`, tracked with batched top-k merges instead of per-candidate heaps;
- a histogram of its values over all scored tokens (exact zeros, i.e. an inactive latent, are
  counted apart), drawn as an inline SVG;
- and, from the weights alone, its top logit effects: `(direction ⊙ g) @ W_Uᵀ`, where W_U is the
  unembedding and g the final norm's scale (Gemma's `1 + weight`). This is the direction's direct
  effect on the logits when the final RMSNorm's 1/rms factor (common to all tokens) is set aside;
  it ignores every layer after the candidate's, as logit-lens effects do.

The page has an index (id, layer, scores, selected?, activity, top token) linking to each card, no
scripts and no external assets.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from caft.activations import iterate_layer_outputs
from caft.concepts import ConceptSet
from caft.discovery.sae.base import SparseAutoencoder
from caft.discovery.sae.rank import encode_latents
from caft.displays import DISPLAY_CSS, Window, make_window, render_window
from caft.errors import CaftError
from caft.models import unwrap_model

FINAL_NORM_PATHS = (
    "model.norm",
    "model.language_model.norm",
    "language_model.model.norm",
    "model.final_layernorm",
    "model.decoder.final_layer_norm",
    "transformer.ln_f",
    "gpt_neox.final_layer_norm",
)


# ---- what is shown for each candidate -------------------------------------------------------------
@dataclass
class LayerFeatures:
    """The candidates at one layer: how to read their values and which directions they write."""

    layer: int
    ids: list[str]
    directions: torch.Tensor  # [k, d] unit rows, for the logit effects
    values: Callable[[torch.Tensor], torch.Tensor]  # layer outputs [N, d] -> values [N, k]
    signed: bool  # both ends mean something (PCs); SAE latents are >= 0
    kind: str  # "SAE latent" or "direction" (values are projections)


def features_from(
    concepts: ConceptSet, saes: Mapping[int, SparseAutoencoder] | None = None
) -> list[LayerFeatures]:
    """LayerFeatures for every candidate of `concepts`: SAE latents (their candidate_index is the
    latent index) when `saes` ({layer: SAE}) is given, projections on the directions otherwise."""
    features = []
    for layer in concepts.layers:
        infos = concepts.infos_at(layer)
        ids = [info.id for info in infos]
        if saes is None:
            basis = concepts.bases_by_layer[layer]
            features.append(LayerFeatures(layer, ids, basis, _projector(basis), True, "direction"))
            continue
        if layer not in saes:
            raise CaftError(
                f"Candidates at layer {layer} but no SAE for it (SAEs given for layers "
                f"{sorted(saes)}): pass the SAE each latent comes from."
            )
        sae = saes[layer]
        latents = [info.candidate_index for info in infos]
        bad = [latent for latent in latents if not 0 <= latent < sae.width]
        if bad:
            raise CaftError(
                f"Layer {layer}: latents {bad} do not exist in {sae.source or 'the SAE'} "
                f"({sae.width} latents); are these candidates from another SAE?"
            )
        rows = sae.W_dec[latents].float()
        directions = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        values = _latent_reader(sae, latents)
        features.append(LayerFeatures(layer, ids, directions, values, False, "SAE latent"))
    return features


def _projector(basis: torch.Tensor):
    def values(hidden: torch.Tensor) -> torch.Tensor:
        return hidden.float() @ basis.T.to(hidden.device)

    return values


def _latent_reader(sae: SparseAutoencoder, latents: list[int]):
    def values(hidden: torch.Tensor) -> torch.Tensor:
        return encode_latents(sae, hidden, latents)

    return values


# ---- one pass over the corpus -------------------------------------------------------------------
@dataclass
class FeatureStats:
    """What the corpus pass found for one candidate."""

    id: str
    top: list[Window] = field(default_factory=list)
    bottom: list[Window] = field(default_factory=list)
    histogram: list[int] = field(default_factory=list)  # counts of the nonzero values
    histogram_range: tuple[float, float] = (0.0, 0.0)  # the bins cover [lo, hi] evenly
    n_tokens: int = 0
    n_zero: int = 0
    mean: float = 0.0
    max: float = 0.0
    min: float = 0.0

    @property
    def active_fraction(self) -> float:
        return (self.n_tokens - self.n_zero) / self.n_tokens if self.n_tokens else 0.0


class _TopDocuments:
    """Per candidate, the n documents with the largest key (their peak value), each kept with its
    whole row of values; merged batch by batch with one top-k for all candidates."""

    def __init__(self, k: int, n: int, length: int):
        self.n = n
        self.keys = torch.empty(k, 0)
        self.documents = torch.empty(k, 0, dtype=torch.long)
        self.peaks = torch.empty(k, 0, dtype=torch.long)
        self.rows = torch.empty(k, 0, length)

    def update(self, aligned: torch.Tensor, documents: torch.Tensor, sign: float) -> None:
        """aligned: [B, length, k] values by document position (NaN where not scored)."""
        scored = torch.where(torch.isnan(aligned), -math.inf, sign * aligned)
        keys, peaks = scored.max(dim=1)  # [B, k]
        k = aligned.shape[2]
        all_keys = torch.cat([self.keys, keys.T], 1)
        all_documents = torch.cat([self.documents, documents[None].expand(k, -1)], 1)
        all_peaks = torch.cat([self.peaks, peaks.T], 1)
        all_rows = torch.cat([self.rows, aligned.permute(2, 0, 1)], 1)
        best = all_keys.topk(min(self.n, all_keys.shape[1]), dim=1).indices
        self.keys = all_keys.gather(1, best)
        self.documents = all_documents.gather(1, best)
        self.peaks = all_peaks.gather(1, best)
        self.rows = all_rows.gather(1, best[..., None].expand(-1, -1, all_rows.shape[2]))


class _Histograms:
    """Streaming histograms of k candidates' values whose range is not known in advance.

    Each candidate's bins cover [-R, R] evenly (2·half bins); R starts at the first nonzero
    magnitude seen and doubles when a larger value arrives, merging neighbouring bins exactly, so
    the bins are at most twice as coarse as with the final range known beforehand.
    """

    def __init__(self, k: int, half_bins: int = 40):
        self.half = half_bins
        self.radius = torch.zeros(k, dtype=torch.float64)
        self.counts = torch.zeros(k, 2 * half_bins, dtype=torch.long)
        self.n_tokens = 0
        self.zeros = torch.zeros(k, dtype=torch.long)
        self.total = torch.zeros(k, dtype=torch.float64)
        self.max = torch.full((k,), -math.inf, dtype=torch.float64)
        self.min = torch.full((k,), math.inf, dtype=torch.float64)

    def update(self, values: torch.Tensor) -> None:
        """values: [N, k] at the scored tokens."""
        if values.shape[0] == 0:
            return
        values = values.double()
        k, bins = values.shape[1], 2 * self.half
        self.n_tokens += values.shape[0]
        nonzero = values != 0
        self.zeros += (~nonzero).sum(0)
        self.total += values.sum(0)
        self.max = torch.maximum(self.max, values.amax(0))
        self.min = torch.minimum(self.min, values.amin(0))
        self._grow(values.abs().amax(0))
        width = (2 * self.radius / bins).clamp_min(1e-300)
        index = ((values + self.radius) / width).floor().long().clamp(0, bins - 1)
        flat = (index + torch.arange(k)[None] * bins)[nonzero]
        self.counts += torch.bincount(flat, minlength=k * bins).view(k, bins)

    def _grow(self, needed: torch.Tensor) -> None:
        fresh = (self.radius == 0) & (needed > 0)
        self.radius[fresh] = needed[fresh]
        merge_into = (self.half + torch.arange(2 * self.half)) // 2
        while True:
            grow = needed > self.radius
            if not grow.any():
                return
            merged = torch.zeros_like(self.counts[grow])
            merged.index_add_(1, merge_into, self.counts[grow])
            self.counts[grow] = merged
            self.radius[grow] *= 2


@torch.no_grad()
def collect_feature_stats(
    model,
    tokenizer,
    documents: Sequence[str],
    features: Sequence[LayerFeatures],
    *,
    n_examples: int = 20,
    window: int = 12,
    max_tokens: int = 128,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, FeatureStats]:
    """{candidate id: FeatureStats} from one pass of `model` over the documents (position 0, the
    attention sink, is not scored, as in discovery and `caft.displays`)."""
    if not documents:
        raise CaftError("The dashboard needs at least one corpus document.")
    token_lists = [tokenizer(doc)["input_ids"][:max_tokens] for doc in documents]
    length = max(len(ids) for ids in token_lists)
    states = [_LayerState(f, n_examples, length) for f in features]
    layers = sorted({f.layer for f in features})
    stream = iterate_layer_outputs(
        model, token_lists, layers, pad_id=tokenizer.pad_token_id, batch_size=batch_size
    )
    n_batches = (len(token_lists) + batch_size - 1) // batch_size
    for outputs, mask, rows in tqdm(
        stream, total=n_batches, desc="dashboard", disable=not progress
    ):
        mask = mask.cpu()
        lengths = [len(token_lists[row]) for row in rows]
        for state in states:
            hidden = outputs[state.features.layer]
            values = state.features.values(hidden.reshape(-1, hidden.shape[-1]))
            values = values.float().cpu().reshape(*hidden.shape[:2], -1)
            state.update(values, mask, torch.tensor(list(rows)), lengths, length)
    stats = {}
    for state in states:
        stats |= state.finish(token_lists, tokenizer, window)
    return stats


class _LayerState:
    def __init__(self, features: LayerFeatures, n_examples: int, length: int):
        k = len(features.ids)
        self.features = features
        self.top = _TopDocuments(k, n_examples, length)
        self.bottom = _TopDocuments(k, n_examples, length) if features.signed else None
        self.histograms = _Histograms(k)

    def update(self, values, mask, documents, lengths, length) -> None:
        self.histograms.update(values[mask])
        masked = values.masked_fill(~mask[..., None], math.nan)
        aligned = torch.full((values.shape[0], length, values.shape[2]), math.nan)
        width = values.shape[1]
        for b, n in enumerate(lengths):  # left padding: document position p is at width - n + p
            aligned[b, :n] = masked[b, width - n :]
        self.top.update(aligned, documents, 1.0)
        if self.bottom is not None:
            self.bottom.update(aligned, documents, -1.0)

    def finish(self, token_lists, tokenizer, window) -> dict[str, FeatureStats]:
        histograms, result = self.histograms, {}
        for j, identifier in enumerate(self.features.ids):
            radius = float(histograms.radius[j])
            n = histograms.n_tokens
            result[identifier] = FeatureStats(
                id=identifier,
                top=self._windows(self.top, j, token_lists, tokenizer, window),
                bottom=self._windows(self.bottom, j, token_lists, tokenizer, window),
                histogram=histograms.counts[j].tolist(),
                histogram_range=(-radius, radius),
                n_tokens=n,
                n_zero=int(histograms.zeros[j]),
                mean=float(histograms.total[j]) / n if n else 0.0,
                max=float(histograms.max[j]) if n else 0.0,
                min=float(histograms.min[j]) if n else 0.0,
            )
        return result

    def _windows(self, tracker, j, token_lists, tokenizer, window) -> list[Window]:
        if tracker is None:
            return []
        windows = []
        for slot in range(tracker.keys.shape[1]):
            key = float(tracker.keys[j, slot])
            # a latent's document counts only where it fires; a projection's wherever scored
            if not math.isfinite(key) or (not self.features.signed and key <= 0):
                continue
            document = int(tracker.documents[j, slot])
            ids = token_lists[document]
            values = tracker.rows[j, slot, : len(ids)].tolist()
            peak = int(tracker.peaks[j, slot])
            windows.append(make_window(document, peak, values, ids, tokenizer, window))
        return windows


# ---- logit effects ------------------------------------------------------------------------------
@dataclass
class LogitEffects:
    positive: list[tuple[str, float]]  # tokens whose logits the direction raises most
    negative: list[tuple[str, float]]  # ... and lowers most


def final_norm_scale(model) -> tuple[torch.Tensor | None, str]:
    """(the final norm's per-dimension scale, what it is), or (None, why) if none is found."""
    base = unwrap_model(model)
    for path in FINAL_NORM_PATHS:
        module = base
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if module is None or not isinstance(module, torch.nn.Module):
            continue
        weight = getattr(module, "weight", None)
        if weight is None:
            return None, f"{path} has no scale"
        weight = weight.detach().float()
        if type(module).__name__.startswith("Gemma"):  # Gemma's RMSNorm scales by 1 + weight
            return 1.0 + weight, f"{path}: 1 + weight (Gemma)"
        return weight, f"{path}.weight"
    return None, "no final norm found"


@torch.no_grad()
def logit_effects(
    model, tokenizer, directions: torch.Tensor, *, top: int = 10, chunk: int = 64
) -> tuple[list[LogitEffects], str]:
    """Each direction's top raised and lowered tokens, `(direction ⊙ g) @ W_Uᵀ` (see the module
    docstring), and a note saying which scale g was used."""
    embeddings = unwrap_model(model).get_output_embeddings()
    if embeddings is None or getattr(embeddings, "weight", None) is None:
        raise CaftError(f"{type(unwrap_model(model)).__name__} has no unembedding (lm_head).")
    unembedding = embeddings.weight.detach()
    scale, note = final_norm_scale(model)
    results = []
    for start in range(0, directions.shape[0], chunk):
        rows = directions[start : start + chunk].to(unembedding.device, torch.float32)
        if scale is not None:
            rows = rows * scale.to(rows.device)
        effects = (rows @ unembedding.float().T).cpu()
        count = min(top, effects.shape[1])
        highest, lowest = effects.topk(count, dim=1), (-effects).topk(count, dim=1)
        for j in range(effects.shape[0]):
            results.append(
                LogitEffects(
                    positive=_tokens(tokenizer, highest.indices[j], highest.values[j]),
                    negative=_tokens(tokenizer, lowest.indices[j], -lowest.values[j]),
                )
            )
    return results, note


def _tokens(tokenizer, ids: torch.Tensor, values: torch.Tensor) -> list[tuple[str, float]]:
    pairs = []
    for token_id, value in zip(ids.tolist(), values.tolist(), strict=True):
        try:
            text = tokenizer.decode([token_id])
        except (IndexError, KeyError, ValueError, TypeError, OverflowError):
            text = f"[{token_id}]"
        pairs.append((text, round(value, 3)))
    return pairs


# ---- the page -----------------------------------------------------------------------------------
@dataclass
class Dashboard:
    """Everything a dashboard page shows, computed; `render_dashboard` turns it into HTML."""

    concepts: ConceptSet
    features: list[LayerFeatures]
    stats: dict[str, FeatureStats]
    effects: dict[str, LogitEffects]
    effects_note: str = ""
    corpus_note: str = ""


def build_dashboard(
    model,
    tokenizer,
    documents: Sequence[str],
    concepts: ConceptSet,
    *,
    saes: Mapping[int, SparseAutoencoder] | None = None,
    corpus_note: str = "",
    n_examples: int = 20,
    window: int = 12,
    max_tokens: int = 128,
    batch_size: int = 8,
    top_logits: int = 10,
    progress: bool = True,
) -> Dashboard:
    """One corpus pass and one unembedding product for all candidates of `concepts` (SAE latents
    read through `saes`, {layer: SAE}, if given; projections otherwise)."""
    concepts.check_compatible(model)
    features = features_from(concepts, saes)
    stats = collect_feature_stats(
        model, tokenizer, documents, features, n_examples=n_examples, window=window,
        max_tokens=max_tokens, batch_size=batch_size, progress=progress,
    )  # fmt: skip
    directions = torch.cat([f.directions for f in features])
    effects, note = logit_effects(model, tokenizer, directions, top=top_logits)
    ids = [identifier for f in features for identifier in f.ids]
    return Dashboard(
        concepts, features, stats, dict(zip(ids, effects, strict=True)), note, corpus_note
    )


def render_dashboard(
    dashboard: Dashboard,
    *,
    title: str = "caft candidate dashboards",
    selected: set[str] | None = None,
    extra_scores: Mapping[str, Mapping[str, float]] | None = None,
) -> str:
    """One self-contained HTML page: an index of all candidates, then one card per candidate.

    extra_scores: {candidate id: {column name: value}}, e.g. each SAE ranking's score or a
    selection score, shown in the index and on the card.
    """
    selected = selected or set()
    extra_scores = extra_scores or {}
    columns = list(dict.fromkeys(name for row in extra_scores.values() for name in row))
    concepts = dashboard.concepts
    kind_of = {i: f.kind for f in dashboard.features for i in f.ids}
    signed_of = {i: f.signed for f in dashboard.features for i in f.ids}
    provenance = concepts.provenance
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{DISPLAY_CSS}{_CSS}</style></head><body>",
        f"<h1 id='index'>{html.escape(title)}</h1>",
        f"<p class='meta'>model: {html.escape(provenance.model)} · method: "
        f"{html.escape(provenance.method)} · data: {html.escape(provenance.data)}<br>corpus: "
        f"{html.escape(dashboard.corpus_note)}<br>value = {_value_note(kind_of)}; red = positive, "
        "blue = negative, the extreme token is boxed. Logit effects: direction ⊙ final-norm scale "
        f"({html.escape(dashboard.effects_note)}) @ unembedding.</p>",
        _index_table(concepts, dashboard.stats, columns, extra_scores, selected),
    ]
    for info in concepts.infos:
        parts.append(
            _card(
                info, dashboard.stats[info.id], dashboard.effects[info.id], kind_of[info.id],
                signed_of[info.id], extra_scores.get(info.id, {}), info.id in selected,
            )
        )  # fmt: skip
    parts.append("</body></html>")
    return "".join(parts)


def _value_note(kind_of: dict[str, str]) -> str:
    kinds = set(kind_of.values())
    notes = {
        "SAE latent": "the SAE latent's activation",
        "direction": "the projection of the layer output on the direction",
    }
    return " / ".join(notes[kind] for kind in sorted(kinds))


def _index_table(concepts, stats, columns, extra_scores, selected) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = [
        "<table class='idx'><tr><th>id</th><th>layer</th><th>index</th><th>score</th>"
        f"{head}<th>selected</th><th>active</th><th>max</th><th>top token</th></tr>"
    ]
    for info in concepts.infos:
        stat = stats[info.id]
        extra = "".join(
            f"<td>{_number(extra_scores.get(info.id, {}).get(c))}</td>" for c in columns
        )
        token = _token_label(stat.top[0].tokens[stat.top[0].peak]) if stat.top else ""
        rows.append(
            f"<tr><td><a href='#{info.id}'>{info.id}</a></td><td>{info.layer}</td>"
            f"<td>{info.candidate_index}</td><td>{_number(info.score)}</td>{extra}"
            f"<td>{'✓' if info.id in selected else ''}</td>"
            f"<td>{100 * stat.active_fraction:.1f}%</td><td>{_number(stat.max)}</td>"
            f"<td class='tok'>{token}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def _card(info, stat: FeatureStats, effects: LogitEffects, kind, signed, extra, is_selected) -> str:
    flag = " <span class='sel'>selected</span>" if is_selected else ""
    scores = " · ".join(f"{html.escape(k)} {_number(v)}" for k, v in extra.items())
    parts = [
        f"<section id='{info.id}'><h2>{info.id}{flag}</h2>",
        f"<p class='meta'>{kind} {info.candidate_index} at layer {info.layer} · score "
        f"{_number(info.score)}{' · ' + scores if scores else ''}"
        f"{' · ' + html.escape(info.note) if info.note else ''}</p>",
        f"<p class='meta'>{stat.n_tokens} tokens · active (≠ 0) {100 * stat.active_fraction:.2f}%"
        f" · mean {_number(stat.mean)} · min {_number(stat.min)} · max {_number(stat.max)}</p>",
        "<div class='row'><div>",
        histogram_svg(stat.histogram, *stat.histogram_range),
        "</div>",
        _effects_table(effects),
        "</div>",
    ]
    sides = [("top", "top activations" if kind == "SAE latent" else "most positive")]
    if signed:
        sides.append(("bottom", "most negative"))
    for side, label in sides:
        windows = getattr(stat, side)
        parts.append(f"<h3>{label}</h3><ol>")
        parts += [f"<li>{render_window(item)}</li>" for item in windows]
        parts.append("</ol>" if windows else "</ol><p class='meta'>never active</p>")
    parts.append("<p class='meta'><a href='#index'>↑ index</a></p></section>")
    return "".join(parts)


def histogram_svg(counts: Sequence[int], lo: float, hi: float, *, width: int = 300) -> str:
    """An inline SVG histogram of the nonzero bins' range: a step outline, the value range below,
    and the tallest bin's count."""
    nonzero = [i for i, count in enumerate(counts) if count]
    if not nonzero:
        return "<p class='meta'>no nonzero values</p>"
    first, last = nonzero[0], nonzero[-1]
    shown = counts[first : last + 1]
    step = (hi - lo) / len(counts)
    left, right = lo + first * step, lo + (last + 1) * step
    tallest, height, bar = max(shown), 60, width / len(shown)
    path = [f"M0 {height}"]
    for i, count in enumerate(shown):
        path.append(f"V{height - count / tallest * height:.1f}H{(i + 1) * bar:.1f}")
    path.append(f"V{height}Z")
    zero = ""
    if left < 0 < right:
        x = -left / (right - left) * width
        zero = f"<line x1='{x:.1f}' x2='{x:.1f}' y1='0' y2='{height}' class='z'/>"
    return (
        f"<svg class='hist' width='{width}' height='{height + 14}' "
        f"viewBox='0 0 {width} {height + 14}'>"
        f"<path d='{''.join(path)}'/>{zero}"
        f"<text x='0' y='{height + 12}'>{left:.3g}</text>"
        f"<text x='{width}' y='{height + 12}' text-anchor='end'>{right:.3g}</text>"
        f"<text x='2' y='10'>{tallest}</text></svg>"
    )


def _effects_table(effects: LogitEffects) -> str:
    def cells(pairs):
        return "".join(
            f"<span class='tok'>{_token_label(text)}</span> "
            f"<span class='val'>{value:+.2f}</span><br>"
            for text, value in pairs
        )

    return (
        "<table class='eff'><tr><th>raises</th><th>lowers</th></tr>"
        f"<tr><td>{cells(effects.positive)}</td><td>{cells(effects.negative)}</td></tr></table>"
    )


def _token_label(text: str) -> str:
    """A token as short, visible, escaped text: line breaks and tabs as symbols, long runs of
    spaces (code indentation tokens) counted, so no token stretches a table."""
    text = text.replace("\r", "␍").replace("\n", "⏎").replace("\t", "⇥")
    text = re.sub(r" {3,}", lambda match: f"␣×{len(match.group())}", text)
    return html.escape(text)


def _number(value) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}"


_CSS = """
.idx{border-collapse:collapse;font-size:.85em}.idx td,.idx th{padding:.1em .5em;text-align:right}
.idx tr:nth-child(even){background:#f4f4f4}.tok{font-family:ui-monospace,monospace;white-space:pre}
.row{display:flex;gap:2em;align-items:flex-start}.hist path{fill:#8a8;stroke:#464}
.hist text{font-size:10px;fill:#555}.hist .z{stroke:#c33;stroke-dasharray:2}
.eff{font-size:.85em}.eff td{vertical-align:top;padding-right:1.5em}
"""
