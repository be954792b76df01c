"""Reading decoder-layer outputs (the residual stream after each block) batch by batch.

Everything here streams: callers get one batch of activations at a time and reduce it, so memory
does not grow with the number of tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from caft.batching import batches, model_device, pad_left, to_device
from caft.models import find_decoder_layers


@contextlib.contextmanager
def capture_layer_outputs(model, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """While active, `store[layer]` holds the latest output hidden state of each listed layer.

    Records what the layer returns (after any hook registered before this one, e.g. an ablation).
    Meant for no-grad forwards: under gradient checkpointing a recompute would overwrite it.
    """
    decoder_layers = find_decoder_layers(model)
    store: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(layer: int):
        def hook(module, inputs, output):
            store[layer] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    try:
        for layer in layers:
            handles.append(decoder_layers[layer].register_forward_hook(make_hook(layer)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def position_mask(attention_mask: torch.Tensor, start_positions: torch.Tensor) -> torch.Tensor:
    """True at real tokens whose index among the real tokens is >= that row's start position."""
    index_among_real = attention_mask.long().cumsum(-1) - 1
    return attention_mask.bool() & (index_among_real >= start_positions[:, None])


@torch.no_grad()
def iterate_layer_outputs(
    model,
    token_lists: Sequence[Sequence[int]],
    layers: Sequence[int],
    *,
    pad_id: int,
    start_positions: Sequence[int] | int = 1,
    batch_size: int = 16,
) -> Iterator[tuple[dict[int, torch.Tensor], torch.Tensor, range]]:
    """Yield (outputs by layer [B, T, d], position mask [B, T], row indices) per batch.

    start_positions: per sequence (or one for all), the first real-token index to keep; position 0
    (the attention sink, whose norm dwarfs the rest) is skipped by default.
    """
    device = model_device(model)
    if isinstance(start_positions, int):
        start_positions = [start_positions] * len(token_lists)
    deepest = max(layers)
    with capture_layer_outputs(model, layers) as store:
        for offset, chunk in _enumerate_batches(token_lists, batch_size):
            batch = to_device(pad_left(chunk, pad_id), device)
            _forward_through(model, batch, deepest)
            starts = torch.tensor(start_positions[offset : offset + len(chunk)], device=device)
            mask = position_mask(batch["attention_mask"], starts)
            yield dict(store), mask, range(offset, offset + len(chunk))


def _enumerate_batches(items: Sequence, batch_size: int):
    for index, chunk in enumerate(batches(items, batch_size)):
        yield index * batch_size, chunk


class _StopForward(Exception):
    """Raised after the deepest layer we need: the rest of the forward pass would be wasted."""


def _forward_through(model, batch: dict[str, torch.Tensor], deepest_layer: int) -> None:
    """Run the model up to `deepest_layer` (inclusive), which fills the capture hooks."""

    def stop(module, inputs, output):
        raise _StopForward

    handle = find_decoder_layers(model)[deepest_layer].register_forward_hook(stop)
    try:
        model(**batch, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
