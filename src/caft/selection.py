"""Choosing which candidate directions to ablate, with no OOD data.

The contrast rule uses only a description of the unwanted concept a user can write: one or more
contrast sets, each two small lists of generic texts for the concept's poles (e.g. sentences with
male vs female words). A candidate's score on a set is |Cohen's d| between the poles of the base
model's mean-over-tokens projection on it; its null is the `quantile` of the same score over random
unit directions at that layer. A candidate is kept if it beats the null on every set (at most
`max_per_layer` per layer, best first). Every candidate's numbers go to a reviewable selection file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from caft.activations import iterate_layer_outputs
from caft.concepts import ConceptSet, direction_id, parse_direction_id
from caft.errors import CaftError
from caft.io import read_json, write_json

SELECTION_FORMAT = "caft.selection"


@dataclass
class ContrastSet:
    name: str
    poles: dict[str, list[str]]  # exactly two poles


@dataclass
class ConceptDescription:
    """What a user knows about the unwanted concept: a sentence, contrast sets for its poles, and
    (for autointerp) a few example inputs of the unwanted task and pointers to what to look for."""

    concept: str
    description: str
    contrast_sets: list[ContrastSet]
    examples: list[str] = field(default_factory=list)
    pointers: list[str] = field(default_factory=list)


@dataclass
class CandidateScore:
    id: str
    layer: int
    candidate_index: int
    score: float  # min over contrast sets of |d| / null; > 1 means it beats random directions
    by_set: dict[str, dict[str, float]] = field(default_factory=dict)  # {"abs_d", "null"}
    passes: bool = False
    selected: bool = False


def load_concept_description(
    path: str | Path, *, require_contrast_sets: bool = True
) -> ConceptDescription:
    """Read a concept file: {"concept", "description", "contrast_sets": [{"name", "poles"}],
    optional "examples" and "pointers" (lists of strings)}. Autointerp needs no contrast sets
    (`require_contrast_sets=False`) but a description."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CaftError(f"Cannot read the concept description {path}: {error}") from error
    sets = data.get("contrast_sets") if isinstance(data, dict) else None
    if not sets and require_contrast_sets:
        raise CaftError(f'{path}: expected {{"contrast_sets": [{{"name": ..., "poles": ...}}]}}.')
    if not require_contrast_sets and not (isinstance(data, dict) and data.get("description")):
        raise CaftError(f'{path}: expected {{"description": "one sentence on the concept", ...}}.')
    extras = {}
    for key in ("examples", "pointers"):
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise CaftError(f'{path}: "{key}" must be a list of strings.')
        extras[key] = value
    contrast_sets = []
    for i, entry in enumerate(sets or []):
        poles = entry.get("poles", {})
        if len(poles) != 2 or any(len(texts) < 5 for texts in poles.values()):
            raise CaftError(
                f"{path}: contrast set {i} ({entry.get('name', '?')}) needs exactly two poles with "
                "at least 5 texts each."
            )
        contrast_sets.append(ContrastSet(name=entry.get("name", f"set{i}"), poles=poles))
    return ConceptDescription(
        concept=data.get("concept", ""),
        description=data.get("description", ""),
        contrast_sets=contrast_sets,
        **extras,
    )


@torch.no_grad()
def mean_activations(
    model, tokenizer, texts: Sequence[str], layers: Sequence[int], *, batch_size: int = 16
) -> dict[int, torch.Tensor]:
    """Per text and layer, the mean layer output over its tokens (position 0 excluded): [n, d]."""
    token_lists = [tokenizer(text)["input_ids"] for text in texts]
    means: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    stream = iterate_layer_outputs(
        model, token_lists, layers, pad_id=tokenizer.pad_token_id, batch_size=batch_size
    )
    for outputs, mask, _ in stream:
        weights = mask.float()[..., None]
        for layer in layers:
            summed = (outputs[layer].float() * weights).sum(1)
            means[layer].append((summed / weights.sum(1).clamp_min(1)).cpu())
    return {layer: torch.cat(chunks) for layer, chunks in means.items()}


def cohens_d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cohen's d along the first axis, for many columns at once: [n_a, m], [n_b, m] -> [m]."""
    pooled = ((a.var(0) * (len(a) - 1) + b.var(0) * (len(b) - 1)) / (len(a) + len(b) - 2)).sqrt()
    return (a.mean(0) - b.mean(0)) / pooled.clamp_min(1e-12)


def score_candidates(
    candidates: ConceptSet,
    model,
    tokenizer,
    description: ConceptDescription,
    *,
    n_random: int = 200,
    quantile: float = 0.99,
    seed: int = 0,
    progress: bool = True,
) -> list[CandidateScore]:
    """Score every candidate against every contrast set and its random-direction null."""
    generator = torch.Generator().manual_seed(seed)
    layers = candidates.layers
    scores = {
        info.id: CandidateScore(info.id, info.layer, info.candidate_index, 0.0)
        for info in candidates.infos
    }
    for contrast in tqdm(
        description.contrast_sets, desc="selection: contrast sets", disable=not progress
    ):
        texts_a, texts_b = contrast.poles.values()
        means_a = mean_activations(model, tokenizer, texts_a, layers)
        means_b = mean_activations(model, tokenizer, texts_b, layers)
        for layer in layers:
            basis = candidates.bases_by_layer[layer]
            abs_d = cohens_d(means_a[layer] @ basis.T, means_b[layer] @ basis.T).abs()
            random_directions = torch.randn(n_random, basis.shape[1], generator=generator)
            random_directions /= random_directions.norm(dim=1, keepdim=True)
            null_d = cohens_d(
                means_a[layer] @ random_directions.T, means_b[layer] @ random_directions.T
            )
            null = torch.quantile(null_d.abs(), quantile).item()
            for info, value in zip(candidates.infos_at(layer), abs_d.tolist(), strict=True):
                scores[info.id].by_set[contrast.name] = {
                    "abs_d": round(value, 4),
                    "null": round(null, 4),
                }
    for score in scores.values():
        ratios = [s["abs_d"] / max(s["null"], 1e-12) for s in score.by_set.values()]
        score.score = round(min(ratios), 4)
        score.passes = score.score > 1.0
    return list(scores.values())


def select_by_contrast(scores: list[CandidateScore], *, max_per_layer: int = 3) -> list[str]:
    """The ids of candidates that beat the null on every set, best `max_per_layer` per layer."""
    chosen = []
    for layer in sorted({s.layer for s in scores}):
        passing = sorted(
            (s for s in scores if s.layer == layer and s.passes), key=lambda s: -s.score
        )
        chosen += [s.id for s in passing[:max_per_layer]]
    for score in scores:
        score.selected = score.id in chosen
    return chosen


def write_selection_file(
    path: str | Path,
    *,
    selected: Sequence[str],
    rule: str,
    candidates_path: str = "",
    scores: Sequence[CandidateScore] = (),
    settings: dict | None = None,
) -> Path:
    """A JSON file a person can review and edit: the chosen ids and every candidate's numbers."""
    return write_json(
        path,
        {
            "format": SELECTION_FORMAT,
            "rule": rule,
            "candidates": candidates_path,
            "settings": settings or {},
            "selected": list(selected),
            "scores": [asdict(score) for score in scores],
        },
    )


def read_selection(path_or_ids: str | Path | Sequence[str]) -> list[str]:
    """Selected ids from a selection file, or from a list / comma-separated string of ids."""
    if isinstance(path_or_ids, (list, tuple)):
        ids = list(path_or_ids)
    elif Path(str(path_or_ids)).is_file():
        data = read_json(path_or_ids)
        if not isinstance(data, dict) or "selected" not in data:
            raise CaftError(f"{path_or_ids}: not a selection file (no 'selected' list).")
        ids = data["selected"]
    else:
        ids = [part for part in str(path_or_ids).split(",") if part.strip()]
    return [direction_id(*parse_direction_id(i)) for i in ids]


def random_directions_like(concepts: ConceptSet, *, seed: int) -> ConceptSet:
    """The control: random orthonormal directions, same count at the same layers."""
    from caft.concepts import Provenance

    provenance = Provenance(
        model=concepts.provenance.model,
        method="random",
        data="none",
        selection=f"random-control (seed {seed}) matching {concepts.ids()}",
    )
    return random_directions(
        concepts.count_by_layer(), concepts.d_model, seed=seed, provenance=provenance,
        selected_by="random-control",
    )  # fmt: skip


def random_directions(
    count_by_layer: dict[int, int], d_model: int, *, seed: int, provenance, selected_by: str
) -> ConceptSet:
    """Gaussian directions (orthonormalised per layer by ConceptSet), `count` at each layer in
    order, drawn from one generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    raw = {
        layer: torch.randn(count, d_model, generator=generator)
        for layer, count in count_by_layer.items()
    }
    result = ConceptSet(raw, provenance=provenance)
    for info in result.infos:
        info.selected_by = selected_by
    return result


def random_latents_like(concepts: ConceptSet, saes, *, seed: int) -> ConceptSet:
    """The SAE control: random latents of the same SAEs ({layer: SparseAutoencoder}), as many per
    layer as `concepts` has there, none of them among the chosen ones (ids name latents)."""
    from caft.concepts import DirectionInfo, Provenance

    generator = torch.Generator().manual_seed(seed)
    rows, infos = {}, []
    for layer, count in concepts.count_by_layer().items():
        if layer not in saes:
            raise CaftError(f"No SAE for layer {layer}: a random-latent control needs one.")
        chosen = {info.candidate_index for info in concepts.infos_at(layer)}
        order = torch.randperm(saes[layer].width, generator=generator).tolist()
        latents = [latent for latent in order if latent not in chosen][:count]
        rows[layer] = saes[layer].W_dec[latents].float()
        infos += [
            DirectionInfo(layer, latent, selected_by="random-latent-control", note="random latent")
            for latent in latents
        ]
    provenance = Provenance(
        model=concepts.provenance.model,
        method="random-latents",
        data="none",
        selection=f"random-latent control (seed {seed}) matching {concepts.ids()}",
    )
    return ConceptSet(rows, provenance=provenance, infos=infos)


def apply_selection(
    candidates: ConceptSet,
    ids: Sequence[str],
    *,
    rule: str,
    scores: Sequence[CandidateScore] = (),
) -> ConceptSet:
    """The chosen candidates as a ConceptSet whose records say who chose them and with what score."""
    chosen = candidates.subset(ids, selection=rule)
    score_by_id = {score.id: score.score for score in scores}
    for info in chosen.infos:
        info.selected_by = rule
        info.selection_score = score_by_id.get(info.id)
    return chosen
