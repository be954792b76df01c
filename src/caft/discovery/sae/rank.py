"""Ranking SAE latents by what a fine-tune did with them, and turning the best into candidates.

Three rankings, each a score for every latent of every SAE (one SAE per layer), computed on the
same token positions as PCA discovery (real tokens after each sequence's start position):

- `attribution`: the linear (first-order) estimate of what ablating a latent does to a metric `m`,

      score_j = Σ_t z_j(h_t) ⟨d_j, ∂m/∂h_t⟩ ,

  summed over positions t of the layer output h (z_j the latent's activation, d_j its decoder row:
  ablating the latent subtracts z_j d_j from h_t, and m(h - z d) ≈ m(h) - z ⟨d, ∇m⟩). The metric
  is the dataset mean of `logit(correct) - logit(incorrect)` at the last position for
  multiple-choice data, and of the answer tokens' log-probability (= -cross-entropy) for chats.
  **Sign convention: score = estimated decrease of the metric when the latent is ablated**, so a
  positive score means the latent supports the model's (by default the fine-tuned model's)
  answers; the largest positive scores are kept, as the paper does. Computed on the fine-tuned
  model (the paper's choice) or, with `attribution_model="base"`, on the base model.
- `mean_diff`: the mean over positions of encode(x_ft) - encode(x_base): latents the fine-tune
  turned up (or down: this one is ranked by |score|, since ablating a direction removes either sign).
- `diff_sae`: the mean over positions of the latents of the difference δ = x_ft - x_base itself:
  the latents that would reconstruct what the fine-tune added. δ lives around 0, not around the
  SAE's centre b_dec, so it is encoded as a centred activation, `pre = δ W_enc + b_enc` (i.e.
  `encode(δ + b_dec)` when the SAE subtracts b_dec from its input); subtracting b_dec from a
  difference would shift every δ by the typical activation and favour latents of that instead.

The union of each ranking's top latents (per layer, or overall) is the candidate list; each latent
becomes its decoder row, orthonormalised per layer in a ConceptSet whose ids are `L<layer>.<latent>`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from caft.ablation import common_prefix_length
from caft.activations import iterate_layer_outputs, position_mask
from caft.batching import (
    batches,
    encode_prompts,
    last_position_logits,
    model_device,
    pad_left,
    single_token_id,
    to_device,
)
from caft.concepts import ConceptSet, DirectionInfo, Provenance, direction_id
from caft.discovery.pca import _base_outputs
from caft.discovery.sae.base import SparseAutoencoder
from caft.errors import CaftError
from caft.io import atomic_write_dir, read_json
from caft.models import find_decoder_layers, hidden_size, model_name
from caft.tasks.base import MCExample

RANKINGS = ("attribution", "mean_diff", "diff_sae")
# How a ranking's top is read: "positive" keeps the largest scores above 0, "absolute" the largest
# |score| (a latent the fine-tune turned down matters as much as one it turned up).
RANKING_ORDER = {"attribution": "positive", "mean_diff": "absolute", "diff_sae": "positive"}
SCOPES = ("layer", "overall")
RANKINGS_TENSORS_FILE = "rankings.safetensors"
RANKINGS_SIDECAR_FILE = "rankings.json"
ROW_CHUNK = 4096  # positions encoded at once: bounds the [positions, width] latent matrices


# ---- data ----------------------------------------------------------------------------------------
@dataclass
class RankingData:
    """Token sequences, where each one's analysed positions start, and what the metric needs."""

    kind: str  # "mc", "chat" or "tokens" (no metric: attribution impossible)
    token_lists: list[list[int]]
    start_positions: list[int]
    correct_ids: list[int] = field(default_factory=list)  # mc: the answer token per prompt
    incorrect_ids: list[int] = field(default_factory=list)  # mc: the other option's token
    labels: list[list[int]] = field(default_factory=list)  # chat: token to predict, -100 elsewhere

    def __len__(self) -> int:
        return len(self.token_lists)


def prepare_ranking_data(
    tokenizer,
    data,
    *,
    start_positions: Sequence[int] | int | None = None,
    max_sequences: int | None = None,
    max_length: int = 1024,
) -> RankingData:
    """Tokenize MCExamples (prompts), chats ({"messages": [...]}) or token id lists for ranking.

    Default start positions: MC, the prompts' shared prefix (at least 1, skipping the attention
    sink); chats, each chat's first answer token (the answer tokens are analysed); token lists, 1.
    """
    if isinstance(data, RankingData):
        return data
    data = list(data)[:max_sequences] if max_sequences else list(data)
    if not data:
        raise CaftError("Ranking SAE latents needs at least one sequence.")
    if all(isinstance(item, MCExample) for item in data):
        prepared = _prepare_mc(tokenizer, data)
    elif all(isinstance(item, dict) for item in data):
        prepared = _prepare_chats(tokenizer, data, max_length)
    elif all(isinstance(item, (list, tuple)) for item in data):
        token_lists = [[int(i) for i in item] for item in data]
        prepared = RankingData("tokens", token_lists, [1] * len(token_lists))
    else:
        kinds = sorted({type(item).__name__ for item in data})
        raise CaftError(
            f"Ranking data must be all MCExamples, all chats ({{'messages': [...]}}) or all token "
            f"id lists; got {', '.join(kinds)}."
        )
    if start_positions is not None:
        prepared.start_positions = _start_list(start_positions, len(prepared))
    return prepared


def _prepare_mc(tokenizer, examples: list[MCExample]) -> RankingData:
    token_lists = encode_prompts(tokenizer, [e.prompt for e in examples])
    start = max(1, common_prefix_length(token_lists))
    return RankingData(
        "mc",
        token_lists,
        [start] * len(token_lists),
        correct_ids=[single_token_id(tokenizer, e.correct) for e in examples],
        incorrect_ids=[single_token_id(tokenizer, e.incorrect) for e in examples],
    )


def _prepare_chats(tokenizer, chats: list[dict], max_length: int) -> RankingData:
    from caft.training import ChatDataset

    rows = [ChatDataset._encode(tokenizer, chat, i, max_length) for i, chat in enumerate(chats)]
    rows = [row for row in rows if any(label != -100 for label in row["labels"])]
    if not rows:
        raise CaftError(f"Every chat's prompt fills max_length={max_length}: no answer tokens.")
    starts = [next(i for i, x in enumerate(row["labels"]) if x != -100) for row in rows]
    return RankingData(
        "chat",
        [row["input_ids"] for row in rows],
        starts,
        labels=[row["labels"] for row in rows],
    )


def _start_list(start_positions: Sequence[int] | int, count: int) -> list[int]:
    if isinstance(start_positions, int):
        return [start_positions] * count
    starts = [int(s) for s in start_positions]
    if len(starts) != count:
        raise CaftError(f"{len(starts)} start positions for {count} sequences.")
    return starts


# ---- encoding ------------------------------------------------------------------------------------
def encode_latents(
    sae: SparseAutoencoder, x: torch.Tensor, latents: Sequence[int] | torch.Tensor | None = None
) -> torch.Tensor:
    """Activations [..., len(latents)] of the chosen latents (all if None), equal to
    `sae.encode(x)[..., latents]`, computing only those latents' columns unless the activation
    (TopK) needs every latent."""
    if latents is None or sae.activation == "topk":
        codes = sae.encode(x)
        return codes if latents is None else codes[..., torch.as_tensor(latents, dtype=torch.long)]
    if sae.input_normalization or (sae.activation == "batchtopk" and float(sae.threshold) < 0):
        sae.encode(torch.zeros(1, sae.d_in))  # such an SAE cannot encode: raises its clear error
    index = torch.as_tensor(latents, dtype=torch.long, device=sae.W_enc.device)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= sae.width):
        raise CaftError(f"Latent indices out of range: this SAE has {sae.width} latents.")
    x = sae._check_input(x, sae.d_in, "encode")
    if sae.apply_b_dec_to_input:
        x = x - sae.b_dec
    pre = x @ sae.W_enc[:, index] + sae.b_enc[index]
    acts = torch.relu(pre)
    if sae.activation == "jumprelu":
        return acts * (pre > sae.threshold[index])
    if sae.activation == "batchtopk":
        return acts * (acts > float(sae.threshold))
    return acts


def encode_difference(sae: SparseAutoencoder, difference: torch.Tensor) -> torch.Tensor:
    """Latents of an activation difference δ, read as a centred activation: `pre = δ W_enc + b_enc`
    whatever the SAE does with b_dec (see the module docstring)."""
    difference = torch.as_tensor(difference).to(sae.b_dec.device, sae.b_dec.dtype)
    return sae.encode(difference + sae.b_dec if sae.apply_b_dec_to_input else difference)


# ---- the rankings --------------------------------------------------------------------------------
@dataclass
class LatentRankings:
    """Every latent's score under each ranking, per layer, and how they were computed."""

    scores: dict[str, dict[int, torch.Tensor]]  # ranking -> layer -> [width] (float32)
    n_positions: dict[int, int] = field(default_factory=dict)
    n_sequences: int = 0
    info: dict = field(default_factory=dict)  # metric, attribution model, SAE sources, data

    @property
    def rankings(self) -> list[str]:
        return list(self.scores)

    @property
    def layers(self) -> list[int]:
        return sorted({layer for by_layer in self.scores.values() for layer in by_layer})

    def top(
        self, ranking: str, n: int, *, layer: int | None = None
    ) -> list[tuple[int, int, float]]:
        """(layer, latent, score) of the ranking's n best latents (at `layer`, or over all layers),
        best first; only latents with a positive score (|score| for 'absolute' rankings) qualify."""
        if ranking not in self.scores:
            raise CaftError(f"No ranking {ranking!r} here; computed: {', '.join(self.scores)}.")
        absolute = RANKING_ORDER.get(ranking) == "absolute"
        entries = []
        for at in self.layers if layer is None else [layer]:
            values = self.scores[ranking][at].double()
            keys = values.abs() if absolute else values
            for latent in torch.argsort(keys, descending=True, stable=True)[:n].tolist():
                if keys[latent] > 0:
                    entries.append((-float(keys[latent]), at, latent, float(values[latent])))
        entries.sort(key=lambda entry: entry[:3])
        return [(at, latent, value) for _, at, latent, value in entries[:n]]

    def scores_of(self, layer: int, latent: int) -> dict[str, float]:
        return {name: float(by_layer[layer][latent]) for name, by_layer in self.scores.items()}

    def save(self, folder: str | Path, *, top_n: int = 50) -> Path:
        """`rankings.safetensors` (every score, key '<ranking>.layer.<L>') and `rankings.json`
        (how they were computed, and each ranking's top `top_n` per layer for a person to read)."""
        tensors = {
            f"{name}.layer.{layer}": values.float().contiguous()
            for name, by_layer in self.scores.items()
            for layer, values in by_layer.items()
        }
        tops = {
            name: {
                str(layer): [
                    {"id": direction_id(layer, latent), "score": round(score, 6)}
                    for _, latent, score in self.top(name, top_n, layer=layer)
                ]
                for layer in self.layers
            }
            for name in self.scores
        }
        sidecar = {
            "format": "caft.LatentRankings",
            "rankings": self.rankings,
            "ranking_order": {name: RANKING_ORDER.get(name, "positive") for name in self.scores},
            "layers": self.layers,
            "n_sequences": self.n_sequences,
            "n_positions": {str(k): v for k, v in self.n_positions.items()},
            "info": self.info,
            "top": tops,
        }
        with atomic_write_dir(folder) as tmp:
            save_file(tensors, str(tmp / RANKINGS_TENSORS_FILE))
            (tmp / RANKINGS_SIDECAR_FILE).write_text(json.dumps(sidecar, indent=2, default=str))
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path) -> LatentRankings:
        folder = Path(folder)
        sidecar_path, tensors_path = folder / RANKINGS_SIDECAR_FILE, folder / RANKINGS_TENSORS_FILE
        if not sidecar_path.is_file() or not tensors_path.is_file():
            raise CaftError(
                f"{folder} holds no SAE latent rankings: expected {RANKINGS_SIDECAR_FILE} and "
                f"{RANKINGS_TENSORS_FILE} (written by `caft discover sae`)."
            )
        sidecar = read_json(sidecar_path)
        scores: dict[str, dict[int, torch.Tensor]] = {name: {} for name in sidecar["rankings"]}
        for key, values in load_file(str(tensors_path)).items():
            name, _, layer = key.rsplit(".", 2)
            scores[name][int(layer)] = values
        return cls(
            scores=scores,
            n_positions={int(k): v for k, v in sidecar.get("n_positions", {}).items()},
            n_sequences=int(sidecar.get("n_sequences", 0)),
            info=sidecar.get("info", {}),
        )


def rank_latents(
    base_model,
    finetuned_model,
    tokenizer,
    data,
    saes: Mapping[int, SparseAutoencoder],
    *,
    rankings: Sequence[str] = RANKINGS,
    start_positions: Sequence[int] | int | None = None,
    attribution_model: str = "finetuned",
    batch_size: int = 8,
    max_sequences: int | None = 512,
    data_description: str = "",
    progress: bool = True,
) -> LatentRankings:
    """Score every latent of every SAE (`saes`: decoder layer -> SAE) under each ranking.

    data: MCExamples, chats or token id lists (see `prepare_ranking_data`); token lists carry no
    metric, so they allow `mean_diff` and `diff_sae` only. base_model may be None when
    `finetuned_model` is a PEFT model (its adapter disabled = the base), as for PCA.
    """
    rankings = _check_rankings(rankings)
    if attribution_model not in ("finetuned", "base"):
        raise CaftError(
            f"attribution_model must be 'finetuned' or 'base', not {attribution_model!r}."
        )
    saes = check_saes(saes, finetuned_model)
    if base_model is not None and hidden_size(base_model) != hidden_size(finetuned_model):
        raise CaftError("The base and fine-tuned models have different hidden sizes.")
    prepared = prepare_ranking_data(
        tokenizer, data, start_positions=start_positions, max_sequences=max_sequences
    )
    if "attribution" in rankings and prepared.kind == "tokens":
        raise CaftError(
            "The attribution ranking needs a metric: pass MCExamples (correct vs incorrect answer) "
            "or chats (answer tokens), not bare token lists; or rank with mean_diff / diff_sae only."
        )
    scores: dict[str, dict[int, torch.Tensor]] = {}
    n_positions: dict[int, int] = {}
    pad_id = tokenizer.pad_token_id
    if "mean_diff" in rankings or "diff_sae" in rankings:
        by_ranking, n_positions = difference_scores(
            base_model, finetuned_model, prepared, saes, pad_id=pad_id, batch_size=batch_size,
            progress=progress,
        )  # fmt: skip
        scores |= {name: by_ranking[name] for name in ("mean_diff", "diff_sae") if name in rankings}
    if "attribution" in rankings:
        with _model_for_attribution(base_model, finetuned_model, attribution_model) as model:
            attribution = attribution_scores(
                model, prepared, saes, pad_id=pad_id, batch_size=batch_size, progress=progress
            )
        scores = {"attribution": attribution} | scores
    ordered = {name: scores[name] for name in rankings}
    info = {
        "data": data_description,
        "data_kind": prepared.kind,
        "attribution_metric": _METRIC_NOTE.get(prepared.kind, ""),
        "attribution_model": attribution_model,
        "sign_convention": "attribution = estimated decrease of the metric when the latent is "
        "ablated (positive: the latent supports the model's answers)",
        "diff_sae_centring": "differences encoded as centred activations: pre = δ W_enc + b_enc",
        "positions": "real tokens at or after each sequence's start position",
        "start_positions": sorted(set(prepared.start_positions)),
        "saes": {str(layer): sae_description(sae) for layer, sae in saes.items()},
        "model": model_name(finetuned_model),
    }
    return LatentRankings(ordered, n_positions, len(prepared), info)


_METRIC_NOTE = {
    "mc": "mean over prompts of logit(correct) - logit(incorrect) at the last position",
    "chat": "mean over answer tokens of their log-probability (= -cross-entropy)",
}


def sae_description(sae: SparseAutoencoder) -> dict:
    return {
        "source": sae.source,
        "format": sae.metadata.get("format", ""),
        "width": sae.width,
        "activation": sae.activation,
        "hook_layer": sae.hook_layer,
        "hook_name": sae.metadata.get("hook_name", ""),
    }


def load_saes(
    sources: Sequence[str | Path], layers: Sequence[int] | None = None
) -> dict[int, SparseAutoencoder]:
    """{layer: SAE} from SAE folders (any format `load_sae` reads), the layer taken from each
    SAE's files, or from `layers` (one per source) where the files do not say."""
    from caft.discovery.sae.formats import load_sae

    if not sources:
        raise CaftError("Give at least one SAE.")
    if layers is not None and len(layers) != len(sources):
        raise CaftError(f"{len(layers)} layers given for {len(sources)} SAEs: give one per SAE.")
    saes: dict[int, SparseAutoencoder] = {}
    for n, source in enumerate(sources):
        sae = load_sae(source, hook_layer=None if layers is None else int(layers[n]))
        if sae.hook_layer is None:
            raise CaftError(
                f"{source}: the SAE's files do not say which decoder layer it reads; give its "
                "layer (--sae-layers on the command line, `layers=` in Python)."
            )
        if sae.hook_layer in saes:
            raise CaftError(
                f"Two SAEs for layer {sae.hook_layer} ({saes[sae.hook_layer].source} and "
                f"{source}): give one SAE per layer."
            )
        saes[sae.hook_layer] = sae
    return dict(sorted(saes.items()))


def check_saes(saes: Mapping[int, SparseAutoencoder], model) -> dict[int, SparseAutoencoder]:
    """{layer: SAE}, each checked against the model (width, residual stream, layer)."""
    if not saes:
        raise CaftError("Give at least one SAE (a mapping from decoder layer to SAE).")
    checked = {}
    for layer, sae in sorted(saes.items()):
        if not isinstance(sae, SparseAutoencoder):
            raise CaftError(
                f"Layer {layer}: expected a SparseAutoencoder, got {type(sae).__name__}."
            )
        sae.check_compatible(model, layer=int(layer))
        checked[int(layer)] = sae
    return checked


def _check_rankings(rankings: Sequence[str]) -> list[str]:
    rankings = [rankings] if isinstance(rankings, str) else list(rankings)
    unknown = [name for name in rankings if name not in RANKINGS]
    if unknown or not rankings:
        raise CaftError(f"Unknown ranking(s) {unknown}; choose from {', '.join(RANKINGS)}.")
    if len(set(rankings)) != len(rankings):
        raise CaftError(f"Rankings repeat: {rankings}.")
    return rankings


@contextlib.contextmanager
def _model_for_attribution(base_model, finetuned_model, which: str):
    if which == "finetuned":
        yield finetuned_model
    elif base_model is not None:
        yield base_model
    elif hasattr(finetuned_model, "disable_adapter"):
        with finetuned_model.disable_adapter():
            yield finetuned_model
    else:
        raise CaftError("Attribution on the base model needs base_model (or a PEFT fine-tune).")


# ---- attribution ---------------------------------------------------------------------------------
def attribution_scores(
    model,
    data: RankingData,
    saes: Mapping[int, SparseAutoencoder],
    *,
    pad_id: int,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """Per layer, every latent's Σ_t z_j ⟨d_j, ∂m/∂h_t⟩ for the dataset-mean metric m (see the
    module docstring for m and the sign), over the positions at or after each start position."""
    layers = sorted(saes)
    totals = {layer: torch.zeros(saes[layer].width, dtype=torch.float64) for layer in layers}
    device = model_device(model)
    normaliser = 0
    n_batches = (len(data) + batch_size - 1) // batch_size
    chunks = enumerate(batches(range(len(data)), batch_size))
    for _, rows in tqdm(chunks, total=n_batches, desc="SAE: attribution", disable=not progress):
        batch = to_device(pad_left([data.token_lists[i] for i in rows], pad_id), device)
        starts = torch.tensor([data.start_positions[i] for i in rows], device=device)
        mask = position_mask(batch["attention_mask"], starts)
        with _gradient_capture(model, layers) as store, torch.enable_grad():
            metric, count = _metric_sum(model, batch, data, rows)
            grads = torch.autograd.grad(metric, [store[layer] for layer in layers])
        normaliser += count
        for layer, grad in zip(layers, grads, strict=True):
            hidden = store[layer].detach()
            totals[layer] += _latent_attribution(saes[layer], hidden[mask], grad[mask])
    if normaliser == 0:
        raise CaftError("No answer tokens to attribute: every chat's reply is empty.")
    return {layer: (total / normaliser).float() for layer, total in totals.items()}


def _latent_attribution(sae: SparseAutoencoder, hidden: torch.Tensor, grad: torch.Tensor):
    """Σ over rows of z(hidden) * (grad @ W_decᵀ): each latent's first-order contribution."""
    total = torch.zeros(sae.width, dtype=torch.float64)
    for start in range(0, hidden.shape[0], ROW_CHUNK):
        codes = sae.encode(hidden[start : start + ROW_CHUNK])
        along = grad[start : start + ROW_CHUNK].to(sae.W_dec.device, sae.W_dec.dtype) @ sae.W_dec.T
        total += (codes * along).sum(0).double().cpu()
    return total


def _metric_sum(model, batch, data: RankingData, rows) -> tuple[torch.Tensor, int]:
    """(sum over the batch of the metric's terms, number of terms): margins for MC, answer-token
    log-probabilities for chats. The dataset metric is the total divided by the total count."""
    if data.kind == "mc":
        logits = last_position_logits(model, batch).float()
        index = torch.arange(len(rows), device=logits.device)
        correct = torch.tensor([data.correct_ids[i] for i in rows], device=logits.device)
        incorrect = torch.tensor([data.incorrect_ids[i] for i in rows], device=logits.device)
        return (logits[index, correct] - logits[index, incorrect]).sum(), len(rows)
    labels = _left_padded_labels([data.labels[i] for i in rows], batch["input_ids"].shape[1])
    labels = labels.to(batch["input_ids"].device)
    logits = model(**batch, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]
    valid = targets != -100
    log_probs = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    return (log_probs * valid).sum(), int(valid.sum())


def _left_padded_labels(labels: list[list[int]], length: int) -> torch.Tensor:
    padded = torch.full((len(labels), length), -100, dtype=torch.long)
    for row, values in enumerate(labels):
        padded[row, length - len(values) :] = torch.as_tensor(values)
    return padded


@contextlib.contextmanager
def _gradient_capture(model, layers: Sequence[int]):
    """While active, `store[layer]` holds each listed layer's output inside the autograd graph.

    The shallowest listed layer's output is replaced by a leaf that requires grad (the same
    values), so gradients reach every listed layer without computing any for the weights.
    """
    decoder_layers = find_decoder_layers(model)
    store: dict[int, torch.Tensor] = {}
    shallowest = min(layers)

    def make_hook(layer: int):
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if layer == shallowest:
                hidden = hidden.detach().requires_grad_(True)
            store[layer] = hidden
            if layer != shallowest:
                return None
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    handles = [decoder_layers[layer].register_forward_hook(make_hook(layer)) for layer in layers]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


# ---- mean latent difference and SAE of the differences -------------------------------------------
@torch.no_grad()
def difference_scores(
    base_model,
    finetuned_model,
    data: RankingData,
    saes: Mapping[int, SparseAutoencoder],
    *,
    pad_id: int,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[dict[str, dict[int, torch.Tensor]], dict[int, int]]:
    """({"mean_diff": {layer: [width]}, "diff_sae": {...}}, positions per layer), streaming both
    models over the same sequences and positions as PCA discovery does."""
    layers = sorted(saes)
    mean_diff = {layer: torch.zeros(saes[layer].width, dtype=torch.float64) for layer in layers}
    diff_sae = {layer: torch.zeros(saes[layer].width, dtype=torch.float64) for layer in layers}
    counts = dict.fromkeys(layers, 0)
    kwargs = dict(pad_id=pad_id, start_positions=data.start_positions, batch_size=batch_size)
    stream = iterate_layer_outputs(finetuned_model, data.token_lists, layers, **kwargs)
    n_batches = (len(data) + batch_size - 1) // batch_size
    with contextlib.closing(stream):
        for outputs, mask, rows in tqdm(
            stream, total=n_batches, desc="SAE: latent differences", disable=not progress
        ):
            finetuned = {layer: outputs[layer][mask].float() for layer in layers}
            base = _base_outputs(
                base_model, finetuned_model, data.token_lists, rows, layers, kwargs
            )
            for layer in layers:
                x_ft, x_base, sae = finetuned[layer], base[layer][mask].float(), saes[layer]
                counts[layer] += x_ft.shape[0]
                for start in range(0, x_ft.shape[0], ROW_CHUNK):
                    ft_rows = x_ft[start : start + ROW_CHUNK]
                    base_rows = x_base[start : start + ROW_CHUNK]
                    change = sae.encode(ft_rows) - sae.encode(base_rows)
                    mean_diff[layer] += change.sum(0).double().cpu()
                    diff_sae[layer] += (
                        encode_difference(sae, ft_rows - base_rows).sum(0).double().cpu()
                    )
    empty = [layer for layer in layers if counts[layer] == 0]
    if empty:
        raise CaftError(
            f"No positions to analyse at or after the start positions ({sorted(set(data.start_positions))}); "
            "give longer sequences or lower the start position."
        )
    scores = {
        "mean_diff": {layer: (mean_diff[layer] / counts[layer]).float() for layer in layers},
        "diff_sae": {layer: (diff_sae[layer] / counts[layer]).float() for layer in layers},
    }
    return scores, counts


# ---- candidates ----------------------------------------------------------------------------------
def candidates_from_rankings(
    rankings: LatentRankings,
    saes: Mapping[int, SparseAutoencoder],
    *,
    top_per_ranking: int = 20,
    scope: str = "layer",
    model: str = "",
    data_description: str = "",
) -> ConceptSet:
    """The union of each ranking's `top_per_ranking` best latents — per layer (scope 'layer') or
    over all layers ('overall') — as decoder rows orthonormalised per layer.

    Ids are `L<layer>.<latent index>`; each record's score is the latent's score under the first
    ranking, and its note says which rankings chose it at which rank.
    """
    if scope not in SCOPES:
        raise CaftError(f"scope must be one of {SCOPES}, got {scope!r}.")
    if top_per_ranking < 1:
        raise CaftError(f"top_per_ranking must be at least 1, got {top_per_ranking}.")
    missing = [layer for layer in rankings.layers if layer not in saes]
    if missing:
        raise CaftError(f"Rankings for layer(s) {missing} but no SAE given for them.")
    chosen = _choose(rankings, top_per_ranking, scope)
    if not chosen:
        raise CaftError(
            "No latent has a positive score under any ranking (the fine-tune changed nothing these "
            "SAEs see?): no candidates."
        )
    primary = rankings.rankings[0]
    directions, infos = {}, []
    for layer in sorted({layer for layer, _ in chosen}):
        latents = [latent for at, latent in chosen if at == layer]
        sae = saes[layer]
        if len(latents) > sae.d_in:
            raise CaftError(
                f"Layer {layer}: {len(latents)} latents chosen but the residual stream has only "
                f"{sae.d_in} dimensions; lower top_per_ranking."
            )
        directions[layer] = sae.W_dec[latents]
        for latent in latents:
            picks = ", ".join(f"{name} #{rank}" for name, rank in chosen[(layer, latent)])
            infos.append(
                DirectionInfo(
                    layer=layer,
                    candidate_index=latent,
                    score=round(float(rankings.scores[primary][layer][latent]), 6),
                    note=f"SAE latent {latent}; chosen by {picks}",
                )
            )
    provenance = Provenance(
        model=model or rankings.info.get("model", ""),
        method="sae",
        data=data_description or rankings.info.get("data", ""),
        selection=f"none (candidates: union of each ranking's top {top_per_ranking} per {scope})",
        extra={
            "score": f"{primary} score of the latent ({_SCORE_NOTES[primary]})",
            "rankings": rankings.rankings,
            "ranking_order": {name: RANKING_ORDER[name] for name in rankings.rankings},
            "top_per_ranking": top_per_ranking,
            "scope": scope,
            "n_sequences": rankings.n_sequences,
            "n_positions": {str(k): v for k, v in rankings.n_positions.items()},
            "chosen_by": {direction_id(*key): dict(picks) for key, picks in sorted(chosen.items())},
        }
        | {key: rankings.info[key] for key in _INFO_KEYS if key in rankings.info},
    )
    try:
        return ConceptSet(directions, provenance=provenance, infos=infos)
    except CaftError as error:
        raise CaftError(
            f"{error} Some chosen latents have (nearly) parallel decoder rows; lower "
            "top_per_ranking or drop duplicate latents."
        ) from error


_SCORE_NOTES = {
    "attribution": "estimated decrease of the metric when the latent is ablated",
    "mean_diff": "mean latent activation, fine-tuned minus base",
    "diff_sae": "mean latent activation of the encoded differences",
}
_INFO_KEYS = ("saes", "attribution_metric", "attribution_model", "sign_convention", "data_kind")


def _choose(rankings: LatentRankings, n: int, scope: str) -> dict[tuple[int, int], list]:
    """{(layer, latent): [(ranking, rank), ...]} in the order first chosen."""
    chosen: dict[tuple[int, int], list] = {}
    for name in rankings.rankings:
        if scope == "overall":
            groups = [rankings.top(name, n)]
        else:
            groups = [rankings.top(name, n, layer=layer) for layer in rankings.layers]
        for picks in groups:
            for rank, (layer, latent, _) in enumerate(picks, start=1):
                chosen.setdefault((layer, latent), []).append((name, rank))
    return chosen


def discover_sae(
    base_model,
    finetuned_model,
    tokenizer,
    data,
    saes: Mapping[int, SparseAutoencoder],
    *,
    rankings: Sequence[str] = RANKINGS,
    top_per_ranking: int = 20,
    scope: str = "layer",
    start_positions: Sequence[int] | int | None = None,
    attribution_model: str = "finetuned",
    batch_size: int = 8,
    max_sequences: int | None = 512,
    data_description: str = "",
    progress: bool = True,
) -> ConceptSet:
    """Candidate SAE latents of a fine-tune: rank every latent (`rank_latents`) and keep the union
    of each ranking's top latents (`candidates_from_rankings`). For the per-latent scores too,
    call those two (as `caft discover sae` does)."""
    scores = rank_latents(
        base_model, finetuned_model, tokenizer, data, saes, rankings=rankings,
        start_positions=start_positions, attribution_model=attribution_model,
        batch_size=batch_size, max_sequences=max_sequences, data_description=data_description,
        progress=progress,
    )  # fmt: skip
    return candidates_from_rankings(
        scores, check_saes(saes, finetuned_model), top_per_ranking=top_per_ranking, scope=scope
    )


__all__ = [
    "RANKINGS",
    "RANKING_ORDER",
    "LatentRankings",
    "RankingData",
    "attribution_scores",
    "candidates_from_rankings",
    "difference_scores",
    "discover_sae",
    "encode_difference",
    "encode_latents",
    "load_saes",
    "prepare_ranking_data",
    "rank_latents",
]
