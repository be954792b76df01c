"""Projecting concept directions out of the residual stream: `h ← h - (h Q) Qᵀ` at chosen layers.

The projection is applied to the output of each chosen decoder block (resid_post). Its Jacobian is
`I - QQᵀ`, so gradients along the directions vanish too: nothing is detached. Hooks live only inside
the `ablate(...)` context, so the trained model is an ordinary model that needs no hooks afterwards.
"""

from __future__ import annotations

import torch
from torch import nn

from caft.concepts import ConceptSet
from caft.errors import CaftError
from caft.models import find_decoder_layers, unwrap_model


class Ablation:
    """Context manager that ablates a ConceptSet from a model's residual stream.

    prefix_tokens: leave the first `prefix_tokens` real (non-pad) tokens of every sequence
        untouched and ablate only the positions after them. 0 (the paper's choice) ablates every
        position. A constant instruction prefix carries no concept (causal attention makes its
        states identical for every prompt); ablating it teaches later layers to expect a prefix
        state that is gone once the hooks are removed, so a positive value is the safer default for
        prompt-format tasks (see `common_prefix_length`).
    scale: 1.0 removes the component; 0 < scale < 1 removes that fraction (partial ablation).
    """

    def __init__(
        self, model: nn.Module, concepts: ConceptSet, *, prefix_tokens: int = 0, scale: float = 1.0
    ):
        if prefix_tokens < 0:
            raise CaftError(f"prefix_tokens must be >= 0, got {prefix_tokens}.")
        concepts.check_compatible(model)
        self.model = model
        self.concepts = concepts
        self.prefix_tokens = int(prefix_tokens)
        self.scale = float(scale)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._bases_on_device: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._position_mask: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> Ablation:
        if self.active:
            raise CaftError("This ablation is already active; contexts cannot be nested on itself.")
        layers = find_decoder_layers(self.model)
        try:
            if self.prefix_tokens:
                top = unwrap_model(self.model)
                self._handles.append(
                    top.register_forward_pre_hook(self._record_positions, with_kwargs=True)
                )
            for layer in self.concepts.layers:
                self._handles.append(layers[layer].register_forward_hook(self._make_hook(layer)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this ablation registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._position_mask = None

    # ---- hooks ---------------------------------------------------------------------------------
    def _record_positions(self, module, args, kwargs):
        """Before each top-level forward, mark which positions come after the prefix."""
        attention_mask = kwargs.get("attention_mask")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if attention_mask is not None and attention_mask.ndim == 2:
            real = attention_mask.bool()
            index_among_real = attention_mask.long().cumsum(-1) - 1
            self._position_mask = real & (index_among_real >= self.prefix_tokens)
        elif reference is not None:
            positions = torch.arange(reference.shape[1], device=reference.device)
            self._position_mask = (positions >= self.prefix_tokens).expand(reference.shape[:2])
        else:
            self._position_mask = None

    def _make_hook(self, layer: int):
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            mask = self._mask_for(hidden)
            projected = project_out(hidden, self._basis(layer, hidden.device), mask, self.scale)
            if isinstance(output, tuple):
                return (projected, *output[1:])
            return projected

        return hook

    def _mask_for(self, hidden: torch.Tensor) -> torch.Tensor | None:
        mask = self._position_mask
        if mask is None:
            return None
        if mask.shape != hidden.shape[:2]:
            # Incremental decoding: the new tokens come after the (already processed) prefix.
            return None
        return mask.to(hidden.device)

    def _basis(self, layer: int, device: torch.device) -> torch.Tensor:
        key = (layer, device)
        if key not in self._bases_on_device:
            self._bases_on_device[key] = self.concepts.bases_by_layer[layer].to(
                device, torch.float32
            )
        return self._bases_on_device[key]


def ablate(
    model: nn.Module, concepts: ConceptSet, *, prefix_tokens: int = 0, scale: float = 1.0
) -> Ablation:
    """Ablate `concepts` from `model` inside a `with` block (see `Ablation`).

    >>> with caft.ablate(model, concepts, prefix_tokens=12):
    ...     trainer.train()
    """
    return Ablation(model, concepts, prefix_tokens=prefix_tokens, scale=scale)


def project_out(
    hidden: torch.Tensor, basis: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0
) -> torch.Tensor:
    """`h - scale·(h Bᵀ) B` in fp32 for rows B [k, d]; positions where `mask` is False are kept."""
    hidden_fp32 = hidden.float()
    coefficients = hidden_fp32 @ basis.T
    if mask is not None:
        coefficients = coefficients * mask[..., None].to(coefficients.dtype)
    return (hidden_fp32 - scale * (coefficients @ basis)).to(hidden.dtype)


def common_prefix_length(token_id_lists: list[list[int]]) -> int:
    """Length of the token prefix shared by every sequence (the constant instruction prefix)."""
    if not token_id_lists:
        return 0
    shortest = min(len(ids) for ids in token_id_lists)
    for position in range(shortest):
        token = token_id_lists[0][position]
        if any(ids[position] != token for ids in token_id_lists):
            return position
    return shortest


def count_hooks(model: nn.Module) -> int:
    """Number of forward (pre-)hooks on the model's modules; a test aid for leak checks."""
    return sum(
        len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules()
    )


try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a core dependency
    TrainerCallback = object


class AblationCallback(TrainerCallback):
    """Trainer callback: ablation on for the whole of `trainer.train()`.

    For use with your own Trainer / TRL SFTTrainer. Prefer wrapping `trainer.train()` in
    `with caft.ablate(...)`: a callback cannot remove its hooks if training raises.
    """

    def __init__(self, concepts: ConceptSet, *, prefix_tokens: int = 0, scale: float = 1.0):
        self.concepts = concepts
        self.prefix_tokens = prefix_tokens
        self.scale = scale
        self.ablation: Ablation | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise CaftError("AblationCallback needs the model passed by the Trainer.")
        self.ablation = ablate(
            model, self.concepts, prefix_tokens=self.prefix_tokens, scale=self.scale
        ).__enter__()

    def on_train_end(self, args, state, control, **kwargs):
        if self.ablation is not None:
            self.ablation.remove()
            self.ablation = None
