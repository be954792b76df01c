"""PCA of fine-tuned-minus-base activation differences: candidate concept directions.

The same token sequences go through the base and the fine-tuned model; at each chosen layer the
differences `x_ft - x_base` at the chosen positions are accumulated into a running mean and
second-moment matrix (float64), so memory is O(layers · d²) whatever the number of tokens. The top
eigenvectors of the centered covariance are the candidates, scored by explained variance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from caft.activations import iterate_layer_outputs
from caft.concepts import ConceptSet, DirectionInfo, Provenance
from caft.errors import CaftError
from caft.models import find_decoder_layers, hidden_size, model_name


@dataclass
class PCAConfig:
    """Options of PCA discovery."""

    layers: list[int] | None = field(
        default=None, metadata={"help": "Layers to analyse (default: all decoder layers)."}
    )
    n_components: int = field(default=10, metadata={"help": "Components kept per layer."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per forward pass."})
    max_sequences: int = field(default=512, metadata={"help": "Use at most this many sequences."})


class CovarianceAccumulator:
    """Streaming mean and covariance of row vectors (float64 sums; O(d²) memory)."""

    def __init__(self, dim: int):
        self.count = 0
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to("cpu", torch.float64)
        self.count += rows.shape[0]
        self.total += rows.sum(0)
        self.outer += rows.T @ rows

    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    def covariance(self) -> torch.Tensor:
        mean = self.mean()
        return self.outer / max(self.count, 1) - torch.outer(mean, mean)


def top_components(covariance: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(components [k, d], their variances [k], total variance) of a covariance matrix.

    Signs are made deterministic: each component's largest-magnitude coordinate is positive.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    order = torch.argsort(eigenvalues, descending=True)[:k]
    components = eigenvectors[:, order].T
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
    components = components * signs
    return components, eigenvalues[order].clamp_min(0), float(eigenvalues.clamp_min(0).sum())


def discover_pca(
    base_model,
    finetuned_model,
    tokenizer,
    token_lists: Sequence[Sequence[int]],
    *,
    start_positions: Sequence[int] | int = 1,
    config: PCAConfig | None = None,
    data_description: str = "",
    progress: bool = True,
) -> ConceptSet:
    """Candidate directions: top PCs of (fine-tuned − base) layer outputs, per layer.

    base_model may be None when `finetuned_model` is a PEFT model: its adapter is then disabled to
    read the base activations from the same object.
    start_positions: first real-token index used in each sequence (e.g. the end of the constant
    prompt prefix, or of the user turn for chat data).
    """
    config = config or PCAConfig()
    n_layers = len(find_decoder_layers(finetuned_model))
    layers = sorted(config.layers) if config.layers is not None else list(range(n_layers))
    _check_layers(layers, n_layers)
    if base_model is not None and hidden_size(base_model) != hidden_size(finetuned_model):
        raise CaftError("The base and fine-tuned models have different hidden sizes.")
    if not token_lists:
        raise CaftError("PCA discovery needs at least one sequence.")
    token_lists = list(token_lists)[: config.max_sequences]
    if not isinstance(start_positions, int):
        start_positions = list(start_positions)[: len(token_lists)]
    accumulators = accumulate_differences(
        base_model, finetuned_model, tokenizer, token_lists, layers,
        start_positions=start_positions, batch_size=config.batch_size, progress=progress,
    )  # fmt: skip
    return _candidates_from(
        accumulators, config, finetuned_model, data_description, len(token_lists)
    )


def accumulate_differences(
    base_model,
    finetuned_model,
    tokenizer,
    token_lists,
    layers: Sequence[int],
    *,
    start_positions,
    batch_size: int,
    progress: bool,
) -> dict[int, CovarianceAccumulator]:
    """Stream both models over the sequences, accumulating x_ft − x_base per layer."""
    width = hidden_size(finetuned_model)
    accumulators = {layer: CovarianceAccumulator(width) for layer in layers}
    kwargs = dict(
        pad_id=tokenizer.pad_token_id, start_positions=start_positions, batch_size=batch_size
    )
    finetuned_stream = iterate_layer_outputs(finetuned_model, token_lists, layers, **kwargs)
    n_batches = (len(token_lists) + batch_size - 1) // batch_size
    for finetuned_outputs, mask, rows in tqdm(
        finetuned_stream, total=n_batches, desc="PCA: activation differences", disable=not progress
    ):
        finetuned_outputs = {k: v.clone() for k, v in finetuned_outputs.items()}
        base_outputs = _base_outputs(base_model, finetuned_model, token_lists, rows, layers, kwargs)
        for layer in layers:
            difference = finetuned_outputs[layer].float() - base_outputs[layer].float()
            accumulators[layer].update(difference[mask])
    return accumulators


def _base_outputs(base_model, finetuned_model, token_lists, rows: range, layers, kwargs):
    chunk = token_lists[rows.start : rows.stop]
    base_kwargs = dict(kwargs, start_positions=1, batch_size=len(chunk))
    context = contextlib.nullcontext()
    model = base_model
    if base_model is None:
        if not hasattr(finetuned_model, "disable_adapter"):
            raise CaftError("base_model=None works only for PEFT models (adapter disabled = base).")
        context, model = finetuned_model.disable_adapter(), finetuned_model
    stream = iterate_layer_outputs(model, chunk, layers, **base_kwargs)
    with context, contextlib.closing(stream):  # closing removes its capture hooks at once
        outputs, _, _ = next(stream)
    return outputs


def _candidates_from(
    accumulators: dict[int, CovarianceAccumulator],
    config: PCAConfig,
    model,
    data_description: str,
    n_sequences: int,
) -> ConceptSet:
    directions, infos, variance_by_layer = {}, [], {}
    for layer, accumulator in accumulators.items():
        if accumulator.count < 2:
            raise CaftError(
                f"Layer {layer}: only {accumulator.count} positions to analyse; give more or longer "
                "sequences, or lower the start position."
            )
        k = min(config.n_components, accumulator.count - 1, accumulator.total.shape[0])
        components, variances, total = top_components(accumulator.covariance(), k)
        directions[layer] = components
        variance_by_layer[layer] = {"total_variance": total, "n_positions": accumulator.count}
        for index, variance in enumerate(variances.tolist()):
            ratio = variance / total if total > 0 else 0.0
            infos.append(DirectionInfo(layer=layer, candidate_index=index, score=round(ratio, 6)))
    provenance = Provenance(
        model=model_name(model),
        method="pca",
        data=data_description,
        selection="none (all candidates)",
        extra={
            "score": "explained variance ratio of the centered differences at that layer",
            "n_sequences": n_sequences,
            "by_layer": {str(k): v for k, v in variance_by_layer.items()},
        },
    )
    return ConceptSet(directions, provenance=provenance, infos=infos)


def _check_layers(layers: Sequence[int], n_layers: int) -> None:
    if not layers:
        raise CaftError("No layers to analyse.")
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise CaftError(f"Layer(s) {bad} do not exist: the model has layers 0..{n_layers - 1}.")
