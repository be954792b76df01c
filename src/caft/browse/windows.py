"""What `caft browse` shows of each candidate's behaviour: its top/bottom corpus windows (from
`caft.displays.collect_windows`) and a histogram of its projection over every corpus token.

Both need the model to read the corpus (a minute or more for the embedded model), so they are
cached in RUN_DIR/browse_windows.json under a key of everything they depend on (the directions, the
model, the corpus, the settings): a restart with the same inputs loads no model at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from caft.activations import iterate_layer_outputs
from caft.concepts import ConceptSet
from caft.displays import Window, collect_windows
from caft.io import read_json, write_json

logger = logging.getLogger(__name__)

CACHE_FILE = "browse_windows.json"
CACHE_FORMAT = "caft.browse_windows"


@dataclass
class Histogram:
    """Counts of a direction's projection over `n_bins` equal bins from `low` to `high`."""

    low: float
    high: float
    counts: list[int]


@dataclass
class CorpusViews:
    """Per candidate id: windows {"top": [...], "bottom": [...]} and a histogram."""

    windows: dict[str, dict[str, list[Window]]]
    histograms: dict[str, Histogram]
    corpus_note: str
    n_documents: int
    n_tokens: int  # tokens in the histograms


@torch.no_grad()
def projection_histograms(
    model,
    tokenizer,
    documents: list[str],
    concepts: ConceptSet,
    *,
    n_bins: int = 40,
    max_tokens: int = 128,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[dict[str, Histogram], int]:
    """({id: histogram}, tokens counted): every direction's projection at every corpus token.

    The same tokens as `collect_windows` (first `max_tokens` per document, position 0 skipped), so
    the windows' peak values fall inside the histogram's range.
    """
    token_lists = [tokenizer(doc)["input_ids"][:max_tokens] for doc in documents]
    chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in concepts.layers}
    stream = iterate_layer_outputs(
        model, token_lists, concepts.layers, pad_id=tokenizer.pad_token_id, batch_size=batch_size
    )
    n_batches = (len(token_lists) + batch_size - 1) // batch_size
    for outputs, mask, _ in tqdm(stream, total=n_batches, desc="histograms", disable=not progress):
        for layer in concepts.layers:
            basis = concepts.bases_by_layer[layer].to(outputs[layer].device)
            chunks[layer].append((outputs[layer][mask].float() @ basis.T).cpu())
    histograms: dict[str, Histogram] = {}
    n_tokens = 0
    for layer, parts in chunks.items():
        projections = torch.cat(parts)  # [tokens, k], columns in the order of infos_at(layer)
        n_tokens = projections.shape[0]
        for column, info in enumerate(concepts.infos_at(layer)):
            histograms[info.id] = _histogram(projections[:, column], n_bins)
    return histograms, n_tokens


def _histogram(values: torch.Tensor, n_bins: int) -> Histogram:
    if values.numel() == 0:
        return Histogram(0.0, 0.0, [0] * n_bins)
    low, high = values.min().item(), values.max().item()
    if high - low < 1e-9:  # a constant projection: one bin in the middle of a unit range
        low, high = low - 0.5, high + 0.5
    counts = torch.histc(values, bins=n_bins, min=low, max=high)
    return Histogram(round(low, 4), round(high, 4), [int(c) for c in counts.tolist()])


def views_key(concepts: ConceptSet, documents: list[str], *, model_key: str, settings: dict) -> str:
    """A fingerprint of everything the views depend on: the directions' values, the model, the
    corpus text and the settings."""
    digest = hashlib.sha256()
    for layer, basis in concepts.bases_by_layer.items():
        digest.update(f"layer {layer}:".encode())
        digest.update(basis.contiguous().numpy().tobytes())
    digest.update(json.dumps(concepts.ids()).encode())
    digest.update(json.dumps({"model": model_key, "settings": settings}, sort_keys=True).encode())
    for document in documents:
        digest.update(document.encode("utf-8") + b"\0")
    return digest.hexdigest()[:24]


def load_or_compute_views(
    run_dir: str | Path,
    concepts: ConceptSet,
    documents: list[str],
    *,
    model_key: str,
    get_model: Callable[[], tuple],
    corpus_note: str,
    n_examples: int = 20,
    window: int = 12,
    progress: bool = True,
) -> CorpusViews:
    """The cached views in RUN_DIR/browse_windows.json if their key matches; otherwise load the
    model with `get_model()` (only then), compute them and cache them."""
    path = Path(run_dir) / CACHE_FILE
    settings = {"n_examples": n_examples, "window": window, "max_tokens": 128, "bins": 40}
    key = views_key(concepts, documents, model_key=model_key, settings=settings)
    cached = _read_cache(path, key, concepts)
    if cached is not None:
        logger.info("browse: windows and histograms from %s", path)
        return cached
    model, tokenizer = get_model()
    windows = collect_windows(
        model, tokenizer, documents, concepts, n_examples=n_examples, window=window,
        progress=progress,
    )  # fmt: skip
    histograms, n_tokens = projection_histograms(
        model, tokenizer, documents, concepts, n_bins=settings["bins"], progress=progress
    )
    views = CorpusViews(windows, histograms, corpus_note, len(documents), n_tokens)
    _write_cache(path, key, model_key, views)
    return views


def _write_cache(path: Path, key: str, model_key: str, views: CorpusViews) -> None:
    data = {
        "format": CACHE_FORMAT,
        "key": key,
        "model": model_key,
        "corpus": views.corpus_note,
        "n_documents": views.n_documents,
        "n_tokens": views.n_tokens,
        "windows": {
            cid: {side: [asdict(w) for w in items] for side, items in sides.items()}
            for cid, sides in views.windows.items()
        },
        "histograms": {cid: asdict(h) for cid, h in views.histograms.items()},
    }
    try:
        write_json(path, data)
    except OSError as error:  # a read-only run folder: browsing still works, just not cached
        logger.warning("browse: could not cache the windows in %s (%s)", path, error)


def _read_cache(path: Path, key: str, concepts: ConceptSet) -> CorpusViews | None:
    if not path.is_file():
        return None
    try:
        data = read_json(path)
        if data.get("format") != CACHE_FORMAT or data.get("key") != key:
            logger.info("browse: %s was made from other inputs; recomputing", path)
            return None
        windows = {
            cid: {side: [Window(**w) for w in items] for side, items in sides.items()}
            for cid, sides in data["windows"].items()
        }
        histograms = {cid: Histogram(**h) for cid, h in data["histograms"].items()}
        if not set(concepts.ids()) <= set(windows) & set(histograms):
            return None
        return CorpusViews(
            windows, histograms, data["corpus"], data["n_documents"], data["n_tokens"]
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        logger.warning("browse: ignoring unreadable %s (%s); recomputing", path, error)
        return None
