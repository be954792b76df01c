"""SparseAutoencoder: one in-memory form for SAEs from every supported format.

Conventions (SAELens'): `W_enc` [d_in, d_sae], `b_enc` [d_sae], `W_dec` [d_sae, d_in], `b_dec`
[d_in]; a latent's decoder direction is its row of `W_dec`. Encoding is

    pre = (x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc

followed by the activation: 'relu'; 'topk' (ReLU, then keep each row's k largest); 'batchtopk'
(inference form of BatchTopK: ReLU, then keep values above the stored scalar threshold); 'jumprelu'
(ReLU where `pre` exceeds the per-latent threshold). Decoding is `z @ W_dec + b_dec`.

`hook_layer` is the decoder layer whose output (the residual stream after that block, TransformerLens'
`blocks.{L}.hook_resid_post`) the SAE reads: the same layer numbering as a ConceptSet.

On disk, caft's own format is a folder with `sae.safetensors` (the tensors above, plus `threshold`)
and `sae.json` (everything else); `save_saelens` writes SAELens' layout instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from caft.errors import CaftError
from caft.io import atomic_write_dir

TENSORS_FILE = "sae.safetensors"
SIDECAR_FILE = "sae.json"
FORMAT_NAME = "caft.SparseAutoencoder"
FORMAT_VERSION = 1
ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")
RESID_POST = "resid_post"
SAELENS_CFG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"


class SparseAutoencoder:
    """An SAE's weights and how to apply them. Build it directly or with `caft.load_sae`.

    `source` names where the weights came from (a file, in error messages); `metadata` is a free
    dict kept with the SAE (format, hook name, model name, ...). `input_normalization` is the
    SAELens `normalize_activations` mode when it is not 'none': such an SAE's decoder directions are
    usable, but `encode` refuses, since the normalisation constants are not in the files.
    """

    def __init__(
        self,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        *,
        activation: str = "relu",
        k: int | None = None,
        threshold: torch.Tensor | float | None = None,
        apply_b_dec_to_input: bool = True,
        hook_layer: int | None = None,
        hook_site: str = RESID_POST,
        input_normalization: str | None = None,
        metadata: dict | None = None,
        source: str = "",
        dtype: torch.dtype = torch.float32,
    ):
        self.source = str(source)
        where = self.source or "SAE"
        tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        tensors = {name: _as_tensor(value, name, where, dtype) for name, value in tensors.items()}
        _check_shapes(tensors, where)
        self.W_enc, self.b_enc = tensors["W_enc"], tensors["b_enc"]
        self.W_dec, self.b_dec = tensors["W_dec"], tensors["b_dec"]
        if activation not in ACTIVATIONS:
            raise CaftError(
                f"{where}: unknown SAE activation {activation!r}; expected one of {ACTIVATIONS}."
            )
        self.activation = activation
        self.k = _check_k(k, activation, self.width, where)
        self.threshold = _check_threshold(threshold, activation, self.width, where, dtype)
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        if hook_layer is not None and (not isinstance(hook_layer, int) or hook_layer < 0):
            raise CaftError(f"{where}: hook_layer must be a layer index ≥ 0, got {hook_layer!r}.")
        self.hook_layer = hook_layer
        self.hook_site = hook_site
        self.input_normalization = input_normalization or None
        self.metadata = dict(metadata or {})

    # ---- views -------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def width(self) -> int:
        """Number of latents (d_sae)."""
        return int(self.W_enc.shape[1])

    d_sae = width

    def decoder_directions(self) -> torch.Tensor:
        """The decoder rows [d_sae, d_in]: latent i writes along row i."""
        return self.W_dec

    def __repr__(self) -> str:
        extra = f", k={self.k}" if self.k is not None else ""
        return (
            f"SparseAutoencoder(d_in={self.d_in}, width={self.width}, "
            f"activation={self.activation!r}{extra}, hook_layer={self.hook_layer}, "
            f"format={self.metadata.get('format', '?')!r})"
        )

    # ---- computation -------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations [..., d_sae] of activations x [..., d_in]."""
        where = self.source or "this SAE"
        if self.input_normalization:
            raise CaftError(
                f"{where} was trained on activations normalised with {self.input_normalization!r}, "
                "whose constants are not in its files; caft can use its decoder directions but "
                "cannot encode with it."
            )
        x = self._check_input(x, self.d_in, "encode")
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        acts = torch.relu(pre)
        if self.activation == "topk":
            top = acts.topk(min(self.k, self.width), dim=-1)
            return torch.zeros_like(acts).scatter_(-1, top.indices, top.values)
        if self.activation == "batchtopk":
            threshold = float(self.threshold)
            if threshold < 0:
                raise CaftError(
                    f"{where}: this BatchTopK SAE has no inference threshold (it is {threshold}: "
                    "training stopped before the threshold was estimated), so it cannot encode."
                )
            return acts * (acts > threshold)
        if self.activation == "jumprelu":
            return acts * (pre > self.threshold)
        return acts

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction [..., d_in] of latent activations z [..., d_sae]."""
        z = self._check_input(z, self.width, "decode")
        return z @ self.W_dec + self.b_dec

    def _check_input(self, x: torch.Tensor, size: int, what: str) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.ndim == 0 or x.shape[-1] != size:
            raise CaftError(
                f"{what}: expected a tensor whose last dimension is {size}, got {tuple(x.shape)}."
            )
        return x.to(self.W_enc.device, self.W_enc.dtype)

    # ---- fitting a model ---------------------------------------------------------------------
    def check_compatible(self, model, layer: int | None = None) -> None:
        """Fail clearly unless this SAE reads `model`'s residual stream at `layer` (if given)."""
        from caft.models import find_decoder_layers, hidden_size

        where = self.source or "this SAE"
        width = hidden_size(model)
        if width != self.d_in:
            raise CaftError(
                f"{where} reads {self.d_in}-dimensional activations but the model's hidden size is "
                f"{width}: it was trained on another model ({self.metadata.get('model_name') or 'unknown'})."
            )
        if self.hook_site != RESID_POST:
            raise CaftError(
                f"{where} reads {self.metadata.get('hook_name') or self.hook_site!r}, not the "
                "residual stream after a decoder layer, which is what caft ablates."
            )
        self._check_layer(layer)
        use = layer if layer is not None else self.hook_layer
        n_layers = len(find_decoder_layers(model))
        if use is not None and not 0 <= use < n_layers:
            raise CaftError(
                f"{where} is for layer {use}, but the model has {n_layers} decoder layers "
                f"(0..{n_layers - 1})."
            )

    def _check_layer(self, layer: int | None) -> None:
        if layer is not None and self.hook_layer is not None and layer != self.hook_layer:
            where = self.source or "this SAE"
            hook = self.metadata.get("hook_name")
            said = f" ({hook})" if hook else ""
            raise CaftError(
                f"{where} was trained on layer {self.hook_layer}{said}, not layer {layer}: its "
                "latents mean nothing at another layer. Use an SAE trained on that layer."
            )

    def to_concept_set(
        self,
        latent_indices: Iterable[int],
        *,
        layer: int | None = None,
        model: str = "",
        data: str = "",
        selection: str = "",
        scores: Sequence[float] | None = None,
    ):
        """A ConceptSet spanning the chosen latents' decoder rows (orthonormalised), at the SAE's
        layer (or `layer`, which must agree with it), with provenance method 'sae'."""
        from caft.concepts import ConceptSet, DirectionInfo, Provenance

        latents = [_latent_index(i, self.width) for i in latent_indices]
        if not latents:
            raise CaftError("Choose at least one SAE latent.")
        if len(set(latents)) != len(latents):
            raise CaftError(f"Latent indices repeat: {latents}.")
        if scores is not None and len(scores) != len(latents):
            raise CaftError(f"{len(scores)} scores for {len(latents)} latents.")
        self._check_layer(layer)
        layer = layer if layer is not None else self.hook_layer
        if layer is None:
            raise CaftError(
                f"The layer of {self.source or 'this SAE'} is unknown: pass layer= (the decoder "
                "layer whose output it was trained on)."
            )
        infos = [
            DirectionInfo(
                layer=layer,
                candidate_index=latent,
                score=None if scores is None else float(scores[n]),
                note=f"SAE latent {latent}",
            )
            for n, latent in enumerate(latents)
        ]
        provenance = Provenance(
            model=model or str(self.metadata.get("model_name") or ""),
            method="sae",
            data=data,
            selection=selection,
            extra={
                "sae": self.source,
                "sae_format": self.metadata.get("format", ""),
                "sae_width": self.width,
                "sae_hook_name": self.metadata.get("hook_name", ""),
                "latents": latents,
            },
        )
        rows = self.W_dec[latents]
        return ConceptSet({layer: rows}, provenance=provenance, infos=infos)

    # ---- persistence -------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            "W_enc": self.W_enc,
            "b_enc": self.b_enc,
            "W_dec": self.W_dec,
            "b_dec": self.b_dec,
        }
        if self.threshold is not None:
            tensors["threshold"] = self.threshold
        return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}

    def save(self, folder: str | Path) -> Path:
        """Write caft's own format (`sae.safetensors` + `sae.json`) into `folder`, atomically."""
        folder = Path(folder)
        sidecar = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "d_in": self.d_in,
            "d_sae": self.width,
            "activation": self.activation,
            "k": self.k,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "hook_layer": self.hook_layer,
            "hook_site": self.hook_site,
            "input_normalization": self.input_normalization,
            "source": self.source,
            "metadata": self.metadata,
        }
        with atomic_write_dir(folder) as tmp:
            save_file(self._tensors(), str(tmp / TENSORS_FILE))
            (tmp / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=2, default=str))
        return folder

    def save_saelens(self, folder: str | Path) -> Path:
        """Write SAELens' layout (`cfg.json` + `sae_weights.safetensors`, its 6.x config keys).

        BatchTopK is written the way SAELens writes it for inference: as JumpReLU with the scalar
        threshold on every latent (the same function, since that threshold is ≥ 0).
        """
        tensors = self._tensors()
        architecture = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}.get(
            self.activation, "jumprelu"
        )
        if self.activation == "batchtopk":
            if float(self.threshold) < 0:
                raise CaftError(
                    "This BatchTopK SAE has no inference threshold; SAELens' layout cannot hold it."
                )
            tensors["threshold"] = self.threshold.expand(self.width).clone()
        hook_name = self.metadata.get("hook_name") or (
            f"blocks.{self.hook_layer}.hook_resid_post" if self.hook_layer is not None else None
        )
        cfg = {
            "architecture": architecture,
            "d_in": self.d_in,
            "d_sae": self.width,
            "dtype": str(self.W_enc.dtype).removeprefix("torch."),
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": self.input_normalization or "none",
            "reshape_activations": "none",
            "metadata": {
                "model_name": self.metadata.get("model_name"),
                "hook_name": hook_name,
                "hook_head_index": None,
                # SAELens reads the keys above as its 6.x layout only when this says ≥ 6.
                "sae_lens_version": "6.0.0",
            },
        }
        if architecture == "topk":
            cfg["k"] = self.k
        folder = Path(folder)
        with atomic_write_dir(folder) as tmp:
            save_file(tensors, str(tmp / SAELENS_WEIGHTS_FILE))
            (tmp / SAELENS_CFG_FILE).write_text(json.dumps(cfg, indent=2))
        return folder


def _as_tensor(value, name: str, where: str, dtype: torch.dtype) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise CaftError(f"{where}: {name} is not a numeric array ({error}).") from error
    if not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64)):
        raise CaftError(f"{where}: {name} has dtype {tensor.dtype}, expected floating point.")
    tensor = tensor.detach().to(dtype)
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise CaftError(f"{where}: {name} contains {bad} NaN or infinite value(s).")
    return tensor.contiguous()


def _check_shapes(tensors: dict[str, torch.Tensor], where: str) -> None:
    W_enc, b_enc, W_dec, b_dec = (tensors[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if W_enc.ndim != 2:
        raise CaftError(f"{where}: W_enc must be [d_in, d_sae], got {tuple(W_enc.shape)}.")
    d_in, d_sae = W_enc.shape
    expected = {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CaftError(
                f"{where}: {name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                f"(W_enc is [d_in={d_in}, d_sae={d_sae}])."
            )
    del b_enc, W_dec, b_dec


def _check_k(k, activation: str, width: int, where: str) -> int | None:
    if activation not in ("topk", "batchtopk"):
        return None if k is None else int(k)
    if k is None or int(k) != k or not 0 < int(k) <= width:
        raise CaftError(f"{where}: a {activation} SAE needs k in 1..{width}, got {k!r}.")
    return int(k)


def _check_threshold(
    threshold, activation: str, width: int, where: str, dtype
) -> torch.Tensor | None:
    if activation == "jumprelu":
        if threshold is None:
            raise CaftError(f"{where}: a JumpReLU SAE needs its threshold tensor.")
        tensor = _as_tensor(threshold, "threshold", where, dtype)
        if tensor.ndim == 0:
            tensor = tensor.expand(width).clone()
        if tuple(tensor.shape) != (width,):
            raise CaftError(
                f"{where}: threshold has shape {tuple(tensor.shape)}, expected ({width},)."
            )
        return tensor
    if activation == "batchtopk":
        if threshold is None:
            raise CaftError(f"{where}: a BatchTopK SAE needs its stored threshold.")
        tensor = _as_tensor(threshold, "threshold", where, dtype)
        if tensor.numel() != 1:
            raise CaftError(
                f"{where}: a BatchTopK threshold is one number, got shape {tuple(tensor.shape)}."
            )
        return tensor.reshape(())
    return None


def _latent_index(value, width: int) -> int:
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise CaftError(f"Latent index {value!r} is not an integer.") from None
    if index != value or not 0 <= index < width:
        raise CaftError(f"Latent index {value!r} is out of range: this SAE has {width} latents.")
    return index
