"""Training sparse autoencoders on a model's residual stream, for models without published SAEs.

    results = train_sae(model, tokenizer, load_corpus(), SAETrainConfig(layers=[3, 9]),
                        output_dir="saes")
    results[3].sae            # a SparseAutoencoder reading the output of decoder layer 3

**Data.** Documents are split (seeded) into training and held-out ones. Each side is tokenized,
concatenated with the EOS token between documents (as sparsify does) and cut into chunks of
`context` tokens, each starting with the tokenizer's BOS token when it has one (as SAELens does).
Position 0 of every chunk (BOS, the attention sink, whose norm dwarfs the rest) and padding are
skipped. The model runs `model_batch_size` chunks at a time, only up to the deepest layer asked for,
and one forward pass feeds every layer's SAE. Activations go into a bounded buffer per layer
(`buffer_rows`), shuffled after each refill; SAE minibatches are taken from it, so memory never grows
with the number of tokens. When the chunks run out, the next pass (epoch) re-runs the model on them
in a new order, until `total_tokens` activation rows have been trained on.

**Architectures.** 'topk' keeps each row's k largest ReLU activations (Gao et al. 2024);
'batchtopk' keeps the k·batch largest of the whole minibatch (Bussmann et al. 2024), and for
inference stores one threshold: the mean, over the training steps after `threshold_start`, of the
smallest activation kept in the batch (dictionary_learning's rule, with a plain mean instead of an
EMA). The saved SAE then uses activation 'batchtopk' with that threshold, as `SparseAutoencoder`
encodes it.

**Optimisation** (as in SAELens / dictionary_learning): decoder rows kept at unit norm (the gradient
component along each row is removed before the Adam step, rows renormalised after it); W_enc
initialised to W_dec.T; b_dec to the geometric median of the first minibatch; Adam with a linear
warm-up and a linear decay to 0 over the last `decay_fraction` of the steps. Gao et al.'s learning
rate, 2e-4 / sqrt(width / 2^14), suits their long runs; caft's are short (10^5 to 10^6 tokens), so
the default is 4x theirs. In a sweep on the embedded model (layer 9, width 2048, k 32, 200k tokens)
held-out FVE was 0.749 at their rate (5.7e-4), 0.789 at 1.5e-3, 0.798 at 2.5e-3, 0.799 at 4e-3
and 0.791 at 8e-3 (with 12% of latents dead). A latent that has not fired for `dead_after` tokens
is dead; the AuxK loss (Gao et al.) lets the `aux_k` most active dead latents reconstruct the
residual error, normalised by its variance and weighted by `aux_coefficient` (1/32).

**Input scaling.** Activations are multiplied by a fixed scalar c, estimated on the first
minibatch so that their mean squared norm is d_in (recorded as `input_scale`). At save time c is
folded into the weights so the saved SAE reads raw activations: with b_enc' = b_enc / c,
b_dec' = b_dec / c and threshold' = threshold / c, the encoder and unit-norm decoder unchanged,
encoding raw x gives latents z / c (the same latents chosen, scaled) and decoding them gives x̂ / c.

**Checkpoints and resume.** Every `checkpoint_every` steps each layer's folder gets a checkpoint,
written atomically: the SAE and Adam tensors, the dead-latent counters, the shuffle buffer and the
data position with the shuffling RNG (safetensors), plus a JSON of step, tokens and settings. A
second call with the same `output_dir` resumes from it, bit for bit, and refuses (CaftError) if the
settings, model or corpus differ. A finished layer (its `metrics.json` written) is not retrained;
its checkpoint is removed.

**Metrics** (per layer, on activations of the held-out documents): fraction of variance explained,
mean L0, the fraction of latents dead at the end of training, and the model's next-token loss on
the held-out chunks clean, with the SAE's reconstruction spliced in at that layer, and with the
layer's output zero-ablated (both at the positions the SAE was trained on: every real token after
position 0; the loss is over the next-token predictions made from those positions), plus the
fraction of the zero-ablation loss the SAE recovers. They go to `output_dir/results.json` and
`results.md`; the per-step loss curve to `layer_{L}/log.jsonl`; the SAE to `layer_{L}/caft`
(caft's format) and `layer_{L}/saelens` (SAELens' layout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from caft.activations import iterate_layer_outputs, position_mask
from caft.batching import batches, model_device, pad_left, to_device
from caft.discovery.sae.base import SparseAutoencoder
from caft.discovery.sae.formats import load_sae
from caft.errors import CaftError
from caft.io import atomic_write_dir, atomic_write_text, read_json, write_json
from caft.models import find_decoder_layers, hidden_size, model_name

ARCHITECTURES = ("topk", "batchtopk")
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_TENSORS = "state.safetensors"
CHECKPOINT_JSON = "state.json"
METRICS_FILE = "metrics.json"
LOG_FILE = "log.jsonl"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
# Settings that do not change what is trained: they may differ between a run and its resumption.
_NOT_COMPARED = ("layers", "checkpoint_every")


@dataclass
class SAETrainConfig:
    """Options of SAE training (one SAE per layer, all layers fed by the same forward passes)."""

    layers: list[int] = field(
        default_factory=list, metadata={"help": "Decoder layers whose output the SAEs read."}
    )
    width: int = field(default=2048, metadata={"help": "Latents per SAE (d_sae)."})
    k: int = field(default=32, metadata={"help": "Active latents per token (TopK / BatchTopK)."})
    architecture: str = field(
        default="topk",
        metadata={"help": "topk: k per token; batchtopk: k·batch per minibatch, then a threshold."},
    )
    total_tokens: int = field(
        default=300_000, metadata={"help": "Activation rows (tokens) to train on, per layer."}
    )
    batch_size: int = field(default=512, metadata={"help": "Activation rows per SAE step."})
    lr: float | None = field(
        default=None, metadata={"help": "Peak Adam learning rate; default 8e-4/sqrt(width/2^14)."}
    )
    warmup_fraction: float = field(
        default=0.05, metadata={"help": "Fraction of steps of linear learning-rate warm-up."}
    )
    decay_fraction: float = field(
        default=0.2, metadata={"help": "Fraction of steps, at the end, of linear decay to 0."}
    )
    context: int = field(default=128, metadata={"help": "Tokens per chunk of text (with BOS)."})
    model_batch_size: int = field(default=8, metadata={"help": "Chunks per forward pass."})
    buffer_rows: int = field(
        default=8192, metadata={"help": "Activation rows per layer held for shuffling."}
    )
    dead_after: int = field(
        default=50_000, metadata={"help": "A latent silent for this many tokens is dead."}
    )
    aux_k: int | None = field(
        default=None, metadata={"help": "Dead latents used by the AuxK loss; default d_in // 2."}
    )
    aux_coefficient: float = field(default=1 / 32, metadata={"help": "Weight of the AuxK loss."})
    threshold_start: float = field(
        default=0.5,
        metadata={"help": "BatchTopK: average the threshold over steps after this fraction."},
    )
    holdout_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of documents held out for the metrics."}
    )
    eval_tokens: int = field(
        default=50_000, metadata={"help": "At most this many held-out tokens for the metrics."}
    )
    checkpoint_every: int = field(
        default=200, metadata={"help": "Steps between checkpoints (resume point)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the split, data order and init."})

    @property
    def steps(self) -> int:
        return self.total_tokens // self.batch_size

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 8e-4 / math.sqrt(self.width / 2**14)

    def validate(self, n_layers: int | None = None) -> None:
        """Fail clearly on settings that cannot train (before any model work)."""
        if not self.layers:
            raise CaftError(
                "Choose the layers to train SAEs on, e.g. layers=[3, 9] (--layers 3,9)."
            )
        for layer in self.layers:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise CaftError(f"Layer {layer!r} is not an integer index.")
            if layer < 0 or (n_layers is not None and layer >= n_layers):
                top = f"0..{n_layers - 1}" if n_layers is not None else "≥ 0"
                raise CaftError(f"Layer {layer} is out of range: the model's layers are {top}.")
        if len(set(self.layers)) != len(self.layers):
            raise CaftError(f"Layers repeat: {self.layers}.")
        if self.architecture not in ARCHITECTURES:
            raise CaftError(
                f"Unknown SAE architecture {self.architecture!r}; choose one of {ARCHITECTURES}."
            )
        if self.width < 2:
            raise CaftError(f"width must be at least 2 latents, got {self.width}.")
        if not 1 <= self.k < self.width:
            raise CaftError(
                f"k must be between 1 and width - 1 = {self.width - 1}, got {self.k}: an SAE that "
                "keeps every latent active is not sparse."
            )
        if self.context < 2:
            raise CaftError(f"context must be at least 2 tokens (BOS + one), got {self.context}.")
        _positive(
            batch_size=self.batch_size, model_batch_size=self.model_batch_size,
            dead_after=self.dead_after, eval_tokens=self.eval_tokens,
            checkpoint_every=self.checkpoint_every,
        )  # fmt: skip
        if self.total_tokens < self.batch_size:
            raise CaftError(
                f"total_tokens ({self.total_tokens}) is less than one batch ({self.batch_size}): "
                "train on more tokens or use a smaller batch_size."
            )
        if self.buffer_rows < self.batch_size:
            raise CaftError(
                f"buffer_rows ({self.buffer_rows}) must hold at least one batch ({self.batch_size})."
            )
        if not self.learning_rate() > 0:
            raise CaftError(f"The learning rate must be positive, got {self.lr}.")
        if self.aux_k is not None and self.aux_k < 0:
            raise CaftError(f"aux_k must be ≥ 0 (0 turns AuxK off), got {self.aux_k}.")
        if self.aux_coefficient < 0:
            raise CaftError(f"aux_coefficient must be ≥ 0, got {self.aux_coefficient}.")
        for name in ("warmup_fraction", "decay_fraction", "threshold_start"):
            if not 0 <= getattr(self, name) <= 1:
                raise CaftError(f"{name} must be between 0 and 1, got {getattr(self, name)}.")
        if self.warmup_fraction + self.decay_fraction > 1:
            raise CaftError("warmup_fraction + decay_fraction must not exceed 1.")
        if not 0 < self.holdout_fraction < 1:
            raise CaftError(
                f"holdout_fraction must be between 0 and 1 (exclusive), got "
                f"{self.holdout_fraction}: the metrics need held-out documents."
            )

    def settings(self) -> dict:
        """Everything that decides what is trained (compared when resuming)."""
        values = dataclasses.asdict(self)
        return {key: value for key, value in values.items() if key not in _NOT_COMPARED}


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise CaftError(f"{name} must be positive, got {value}.")


@dataclass
class SAETrainResult:
    """One layer's outcome. `sae` and `metrics` are None / empty while training is unfinished
    (stopped by `stop_after_steps`); `step` counts the SAE steps done."""

    layer: int
    folder: Path
    step: int
    steps: int
    sae: SparseAutoencoder | None = None
    metrics: dict = field(default_factory=dict)
    trained_now: bool = False

    @property
    def finished(self) -> bool:
        return self.sae is not None


# ---- data ------------------------------------------------------------------------------------
def split_documents(
    documents: Sequence[str], holdout_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """(training, held-out) documents: a seeded shuffle, at least one document on each side."""
    documents = [d for d in documents if d and d.strip()]
    if len(documents) < 2:
        raise CaftError(
            f"The corpus has {len(documents)} non-empty document(s); SAE training needs at least 2 "
            "(some are held out for the metrics). Documents are separated by blank lines."
        )
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist()
    n_held = min(len(documents) - 1, max(1, round(holdout_fraction * len(documents))))
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    return [documents[i] for i in train], [documents[i] for i in held]


def token_chunks(tokenizer, documents: Sequence[str], context: int) -> list[list[int]]:
    """Documents joined by EOS and cut into chunks of `context` tokens, each led by BOS if any.

    A final chunk too short to hold a token after position 0 is dropped.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for n, document in enumerate(documents):
        if n and eos is not None:
            stream.append(eos)
        stream.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
    body = context - 1 if bos is not None else context
    lead = [bos] if bos is not None else []
    chunks = [lead + stream[i : i + body] for i in range(0, len(stream), body)]
    return [chunk for chunk in chunks if len(chunk) >= 2]


class ActivationStream:
    """Shuffled minibatches of one layer-output row per token, for several layers at once.

    Refills run the model on the next `model_batch_size` chunks (a new seeded order each pass over
    the chunks) and append every kept position's output to each layer's buffer, then shuffle the
    buffer (the same permutation for all layers, so a row index is one token everywhere).
    """

    def __init__(
        self,
        model,
        chunks: Sequence[Sequence[int]],
        layers: Sequence[int],
        *,
        pad_id: int,
        model_batch_size: int,
        buffer_rows: int,
        seed: int,
    ):
        if not chunks:
            raise CaftError("No training text: the training documents tokenize to nothing.")
        self.model, self.chunks, self.layers = model, list(chunks), list(layers)
        self.pad_id, self.model_batch_size, self.buffer_rows = pad_id, model_batch_size, buffer_rows
        self.seed = seed
        self.epoch, self.position, self.rows_read = 0, 0, 0
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.device = model_device(model)
        self.buffers: dict[int, torch.Tensor] = {}
        self.rows_per_epoch = sum(len(chunk) - 1 for chunk in self.chunks)

    @property
    def buffered(self) -> int:
        return int(next(iter(self.buffers.values())).shape[0]) if self.buffers else 0

    def next_batch(self, size: int) -> dict[int, torch.Tensor]:
        """`size` rows per layer (float32 [size, d_in]), taken from the shuffled buffer."""
        while self.buffered < max(size, self.buffer_rows):
            self._refill()
        batch = {layer: rows[:size] for layer, rows in self.buffers.items()}
        self.buffers = {layer: rows[size:] for layer, rows in self.buffers.items()}
        return batch

    def _epoch_order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.chunks), generator=generator).tolist()

    def _refill(self) -> None:
        order = self._epoch_order()
        picked = [
            self.chunks[i] for i in order[self.position : self.position + self.model_batch_size]
        ]
        self.position += len(picked)
        if self.position >= len(self.chunks):
            self.epoch, self.position = self.epoch + 1, 0
        stream = iterate_layer_outputs(
            self.model, picked, self.layers, pad_id=self.pad_id, batch_size=len(picked)
        )
        for outputs, mask, _ in stream:
            for layer in self.layers:
                rows = outputs[layer][mask].float()
                old = self.buffers.get(layer)
                self.buffers[layer] = rows if old is None else torch.cat([old, rows])
            self.rows_read += int(mask.sum())
        permutation = torch.randperm(self.buffered, generator=self.generator).to(self.device)
        self.buffers = {layer: rows[permutation] for layer, rows in self.buffers.items()}

    # -- checkpointing --
    def state(self, layer: int) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"buffer": self.buffers[layer].clone(), "rng_state": self.generator.get_state()}
        info = {"epoch": self.epoch, "position": self.position, "rows_read": self.rows_read}
        return tensors, info

    def load_state(self, buffers: dict[int, torch.Tensor], rng_state: torch.Tensor, info: dict):
        self.buffers = {layer: rows.to(self.device) for layer, rows in buffers.items()}
        self.generator.set_state(rng_state)
        self.epoch, self.position = int(info["epoch"]), int(info["position"])
        self.rows_read = int(info["rows_read"])


# ---- one SAE being trained ---------------------------------------------------------------------
def geometric_median(points: torch.Tensor, iterations: int = 100) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distances to `points` [n, d]."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1 / (points - median).norm(dim=-1).clamp_min(1e-8)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() <= 1e-6 * (median.norm() + 1e-12):
            return new
        median = new
    return median


class Kept(NamedTuple):
    """A minibatch's ReLU activations [B, W] and the latents kept, as (row, column, value)
    triplets sorted by row."""

    acts: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor


class SAETrainer:
    """One TopK / BatchTopK SAE in training: parameters in normalised units (x · input_scale),
    Adam, dead-latent counters and the BatchTopK threshold estimate."""

    def __init__(self, d_in: int, config: SAETrainConfig, *, seed: int, device="cpu"):
        self.config, self.d_in, self.device = config, d_in, torch.device(device)
        generator = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(config.width, d_in, generator=generator)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = torch.nn.Parameter(W_dec.to(self.device))
        self.W_enc = torch.nn.Parameter(W_dec.T.clone().to(self.device))
        self.b_enc = torch.nn.Parameter(torch.zeros(config.width, device=self.device))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in, device=self.device))
        self.optimizer = torch.optim.Adam(self.parameters(), lr=config.learning_rate())
        self.tokens_since_fired = torch.zeros(config.width, dtype=torch.long, device=self.device)
        self.input_scale: float | None = None
        self.threshold_sum, self.threshold_count = 0.0, 0
        self.aux_k = min(config.aux_k if config.aux_k is not None else d_in // 2, config.width)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.W_enc, self.b_enc, self.W_dec, self.b_dec]

    @torch.no_grad()
    def initialise(self, x: torch.Tensor) -> None:
        """Fix the input scale (mean squared norm d_in) and set b_dec to the geometric median."""
        mean_square = float(x.float().pow(2).sum(-1).mean())
        if not mean_square > 0 or not math.isfinite(mean_square):
            raise CaftError(f"The first batch of activations has mean squared norm {mean_square}.")
        self.input_scale = math.sqrt(self.d_in / mean_square)
        self.b_dec.copy_(geometric_median(x.float() * self.input_scale))

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.config.dead_after

    def encode(self, x: torch.Tensor) -> Kept:
        """The ReLU activations of normalised x and the latents the architecture keeps."""
        # x @ W_enc - (b_dec @ W_enc) spares the [B, d] gradient that (x - b_dec) @ W_enc needs
        acts = torch.relu(x @ self.W_enc - (self.b_dec @ self.W_enc - self.b_enc))
        batch, width = acts.shape
        if self.config.architecture == "topk":
            top = acts.topk(self.config.k, dim=-1)
            rows = torch.arange(batch, device=acts.device).repeat_interleave(self.config.k)
            return Kept(acts, rows, top.indices.flatten(), top.values.flatten())
        top = acts.flatten().topk(self.config.k * batch)
        flat, order = top.indices.sort()  # grouped by row, as decode's bags need
        return Kept(acts, flat // width, flat % width, top.values[order])

    def decode(self, kept: Kept) -> torch.Tensor:
        """Sparse decoding: sums of the kept latents' decoder rows (F.embedding_bag), plus b_dec."""
        batch = kept.acts.shape[0]
        offsets = torch.searchsorted(kept.rows, torch.arange(batch, device=kept.rows.device))
        decoded = F.embedding_bag(
            kept.cols, self.W_dec, offsets, mode="sum", per_sample_weights=kept.values
        )
        return decoded + self.b_dec

    def dense_latents(self, kept: Kept) -> torch.Tensor:
        """The kept latents as a dense [B, W] tensor."""
        dense = torch.zeros_like(kept.acts)
        return dense.index_put((kept.rows, kept.cols), kept.values)

    def step(self, x_raw: torch.Tensor, lr: float, *, record_threshold: bool = False) -> dict:
        """One Adam step on a minibatch of raw activations; returns the step's statistics."""
        if self.input_scale is None:
            raise CaftError("SAETrainer.initialise must see a first batch before training.")
        x = x_raw.to(self.device, torch.float32) * self.input_scale
        kept = self.encode(x)
        error = x - self.decode(kept)
        mse = error.pow(2).sum(-1).mean()
        active = kept.values > 0
        with torch.no_grad():
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired[kept.cols[active]] = 0
        aux = self.aux_loss(error.detach(), kept.acts)
        loss = mse + self.config.aux_coefficient * aux
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._remove_parallel_gradient()
        self.optimizer.step()
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True)
            if self.config.architecture == "batchtopk" and record_threshold and active.any():
                self.threshold_sum += float(kept.values[active].min())
                self.threshold_count += 1
            variance = (x - x.mean(0)).pow(2).sum(-1).mean()
        mse = float(mse.detach())
        return {
            "mse": mse,
            "fve": 1 - mse / max(float(variance), 1e-12),
            "aux_loss": float(aux.detach()),
            "l0": float(active.sum()) / x.shape[0],
            "dead_fraction": float(self.dead_mask().float().mean()),
            "lr": lr,
        }

    def aux_loss(self, residual: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """AuxK: how well the top-`aux_k` dead latents reconstruct the residual error, over its
        variance (0 when no latent is dead)."""
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0 or self.aux_k == 0:
            return torch.zeros((), device=self.device)
        candidates = torch.where(dead[None], acts, torch.full_like(acts, -torch.inf))
        top = candidates.topk(min(self.aux_k, n_dead), dim=-1)
        aux_latents = torch.zeros_like(acts).scatter(-1, top.indices, top.values)
        reconstruction = aux_latents @ self.W_dec
        l2 = (residual - reconstruction).pow(2).sum(-1).mean()
        variance = float((residual - residual.mean(0)).pow(2).sum(-1).mean())
        if not variance > 1e-12:  # a batch of identical rows: no error pattern to explain
            return torch.zeros((), device=self.device)
        return l2 / variance

    @torch.no_grad()
    def _remove_parallel_gradient(self) -> None:
        """Keep the decoder on the unit sphere: drop each row's gradient along the row."""
        grad = self.W_dec.grad
        if grad is not None:
            grad -= (grad * self.W_dec).sum(-1, keepdim=True) * self.W_dec

    def threshold(self) -> float:
        """BatchTopK inference threshold in normalised units (-1 before any estimate)."""
        return self.threshold_sum / self.threshold_count if self.threshold_count else -1.0

    @torch.no_grad()
    def to_sae(self, *, hook_layer: int | None, metadata: dict) -> SparseAutoencoder:
        """The SAE on raw activations: the input scale folded into b_enc, b_dec, threshold."""
        scale = self.input_scale or 1.0
        threshold = None
        if self.config.architecture == "batchtopk":
            threshold = self.threshold() / scale if self.threshold_count else -1.0
        return SparseAutoencoder(
            self.W_enc.detach().cpu(),
            self.b_enc.detach().cpu() / scale,
            self.W_dec.detach().cpu(),
            self.b_dec.detach().cpu() / scale,
            activation=self.config.architecture,
            k=self.config.k,
            threshold=threshold,
            hook_layer=hook_layer,
            metadata=metadata,
        )

    # -- checkpointing --
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {
            name: getattr(self, name).detach() for name in ("W_enc", "b_enc", "W_dec", "b_dec")
        }
        tensors["tokens_since_fired"] = self.tokens_since_fired
        adam_steps = []
        for n, parameter in enumerate(self.parameters()):
            state = self.optimizer.state.get(parameter, {})
            if state:
                tensors[f"adam.{n}.exp_avg"] = state["exp_avg"]
                tensors[f"adam.{n}.exp_avg_sq"] = state["exp_avg_sq"]
                adam_steps.append(float(state["step"]))
        info = {
            "input_scale": self.input_scale,
            "threshold_sum": self.threshold_sum,
            "threshold_count": self.threshold_count,
            "adam_steps": adam_steps,
        }
        return tensors, info

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor], info: dict) -> None:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(self, name).copy_(tensors[name])
        self.tokens_since_fired.copy_(tensors["tokens_since_fired"])
        self.input_scale = info["input_scale"]
        self.threshold_sum = float(info["threshold_sum"])
        self.threshold_count = int(info["threshold_count"])
        if info["adam_steps"]:
            for n, parameter in enumerate(self.parameters()):
                self.optimizer.state[parameter] = {
                    "step": torch.tensor(info["adam_steps"][n]),
                    "exp_avg": tensors[f"adam.{n}.exp_avg"].to(self.device).clone(),
                    "exp_avg_sq": tensors[f"adam.{n}.exp_avg_sq"].to(self.device).clone(),
                }


def learning_rate_at(step: int, config: SAETrainConfig) -> float:
    """Linear warm-up, constant, then linear decay to 0 over the last `decay_fraction`."""
    steps, peak = config.steps, config.learning_rate()
    warmup = max(1, round(config.warmup_fraction * steps))
    decay_start = steps - round(config.decay_fraction * steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= decay_start:
        return peak * (steps - step) / max(1, steps - decay_start)
    return peak


# ---- metrics -----------------------------------------------------------------------------------
@contextlib.contextmanager
def replace_layer_output(
    model, layer: int, replace: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[dict]:
    """While active, decoder layer `layer`'s output at the positions in `where["mask"]` ([B, T]
    bool, set by the caller before each forward) is replaced by `replace(rows)` (float32 rows)."""
    where: dict = {}

    def hook(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        mask = where["mask"]
        new = hidden.clone()
        new[mask] = replace(hidden[mask].float()).to(hidden.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = find_decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield where
    finally:
        handle.remove()


@torch.no_grad()
def next_token_loss(
    model,
    token_lists: Sequence[Sequence[int]],
    *,
    pad_id: int,
    layer: int | None = None,
    replace: Callable[[torch.Tensor], torch.Tensor] | None = None,
    start_position: int = 1,
    batch_size: int = 8,
) -> float:
    """Mean next-token cross-entropy of the predictions made from positions ≥ `start_position`;
    with `layer` and `replace`, the layer's output there is replaced (e.g. by an SAE's
    reconstruction: `replace=lambda x: sae.decode(sae.encode(x))`)."""
    device = model_device(model)
    total, count = 0.0, 0
    splice = (
        replace_layer_output(model, layer, replace)
        if replace is not None and layer is not None
        else contextlib.nullcontext({})
    )
    with splice as where:
        for chunk in batches(list(token_lists), batch_size):
            batch = to_device(pad_left(chunk, pad_id), device)
            starts = torch.full((len(chunk),), start_position, device=device)
            mask = position_mask(batch["attention_mask"], starts)
            where["mask"] = mask
            logits = model(**batch, use_cache=False).logits[:, :-1].float()
            targets = batch["input_ids"][:, 1:]
            scored = mask[:, :-1] & batch["attention_mask"][:, 1:].bool()
            total += float(F.cross_entropy(logits[scored], targets[scored], reduction="sum"))
            count += int(scored.sum())
    if count == 0:
        raise CaftError("No tokens to score: every held-out chunk is shorter than 2 tokens.")
    return total / count


@torch.no_grad()
def reconstruction_metrics(
    model,
    saes: dict[int, SparseAutoencoder],
    token_lists: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 8,
) -> dict[int, dict]:
    """Per layer: fraction of variance explained, mean L0 and the fraction of latents that never
    fire, over every position ≥ 1 of `token_lists` (streamed)."""
    sums = {layer: _ReconstructionSums(sae) for layer, sae in saes.items()}
    stream = iterate_layer_outputs(
        model, token_lists, list(saes), pad_id=pad_id, batch_size=batch_size
    )
    for outputs, mask, _ in stream:
        for layer, sae in saes.items():
            sums[layer].add(sae, outputs[layer][mask].float())
    return {layer: accumulated.result() for layer, accumulated in sums.items()}


class _ReconstructionSums:
    def __init__(self, sae: SparseAutoencoder):
        self.n, self.square, self.error, self.l0 = 0, 0.0, 0.0, 0.0
        self.total = torch.zeros(sae.d_in, dtype=torch.float64)
        self.fired = torch.zeros(sae.width, dtype=torch.bool)

    def add(self, sae: SparseAutoencoder, x: torch.Tensor) -> None:
        x = x.cpu()
        latents = sae.encode(x)
        x_hat = sae.decode(latents)
        self.n += x.shape[0]
        self.total += x.double().sum(0)
        self.square += float(x.double().pow(2).sum())
        self.error += float((x - x_hat).double().pow(2).sum())
        self.l0 += float((latents > 0).sum())
        self.fired |= (latents > 0).any(0)

    def result(self) -> dict:
        variance = self.square - float(self.total.pow(2).sum()) / max(self.n, 1)
        return {
            "fve": 1 - self.error / variance if variance > 0 else float("nan"),
            "mse": self.error / max(self.n, 1),
            "mean_l0": self.l0 / max(self.n, 1),
            "unfired_held_out_fraction": float((~self.fired).float().mean()),
            "eval_tokens": self.n,
        }


def sae_metrics(
    model, saes: dict[int, SparseAutoencoder], token_lists, *, pad_id: int, progress: bool = False
) -> dict[int, dict]:
    """Reconstruction metrics plus the next-token loss clean / SAE spliced in / zero-ablated."""
    metrics = reconstruction_metrics(model, saes, token_lists, pad_id=pad_id)
    clean = next_token_loss(model, token_lists, pad_id=pad_id)
    for layer, sae in tqdm(saes.items(), desc="spliced loss", disable=not progress):
        spliced = next_token_loss(
            model, token_lists, pad_id=pad_id, layer=layer,
            replace=lambda x, sae=sae: sae.decode(sae.encode(x)),
        )  # fmt: skip
        zero = next_token_loss(
            model, token_lists, pad_id=pad_id, layer=layer, replace=torch.zeros_like
        )
        metrics[layer].update(
            ce_loss_clean=clean,
            ce_loss_spliced=spliced,
            ce_loss_zero_ablated=zero,
            ce_loss_recovered=(zero - spliced) / (zero - clean) if zero != clean else float("nan"),
        )
    return metrics


# ---- orchestration -----------------------------------------------------------------------------
def train_sae(
    model,
    tokenizer,
    documents: Sequence[str],
    config: SAETrainConfig,
    *,
    output_dir: str | Path,
    progress: bool = True,
    stop_after_steps: int | None = None,
    data_description: str = "",
) -> dict[int, SAETrainResult]:
    """Train (or resume, or just read back) one SAE per layer in `config.layers`.

    `stop_after_steps` ends this call after that many steps, with a checkpoint written (for
    time-sliced jobs); a later call resumes. Returns {layer: SAETrainResult}.
    """
    decoder_layers = find_decoder_layers(model)
    d_in = hidden_size(model)
    config.validate(len(decoder_layers))
    if stop_after_steps is not None and stop_after_steps < 1:
        raise CaftError(f"stop_after_steps must be positive, got {stop_after_steps}.")
    documents = [d for d in documents if d and d.strip()]
    if not documents:
        raise CaftError("The corpus is empty: SAE training needs text documents.")
    train_docs, held_docs = split_documents(documents, config.holdout_fraction, config.seed)
    train_chunks = token_chunks(tokenizer, train_docs, config.context)
    held_chunks = _limit_tokens(token_chunks(tokenizer, held_docs, config.context), config)
    if not held_chunks:
        raise CaftError("The held-out documents tokenize to nothing; use a larger corpus.")
    run = _Run(
        model=model,
        tokenizer=tokenizer,
        config=config,
        output_dir=Path(output_dir),
        fingerprint=_fingerprint(model, tokenizer, documents, config, d_in),
        train_chunks=train_chunks,
        held_chunks=held_chunks,
        progress=progress,
        data_description=data_description,
        counts={"train_documents": len(train_docs), "held_out_documents": len(held_docs)},
    )
    results: dict[int, SAETrainResult] = {}
    pending: dict[int, list[int]] = {}  # checkpoint step -> layers resuming from it
    for layer in sorted(config.layers):
        finished = run.finished_result(layer)
        if finished is not None:
            results[layer] = finished
        else:
            pending.setdefault(run.checkpoint_step(layer), []).append(layer)
    for _, layers in sorted(pending.items()):
        results.update(run.train_group(layers, stop_after_steps))
    _write_results(run.output_dir)
    return {layer: results[layer] for layer in sorted(results)}


def _limit_tokens(chunks: list[list[int]], config: SAETrainConfig) -> list[list[int]]:
    kept, tokens = [], 0
    for chunk in chunks:
        if tokens >= config.eval_tokens:
            break
        kept.append(chunk)
        tokens += len(chunk) - 1
    return kept


def _fingerprint(model, tokenizer, documents, config: SAETrainConfig, d_in: int) -> dict:
    corpus = hashlib.sha256("\x00".join(documents).encode("utf-8")).hexdigest()
    return {
        **config.settings(),
        "model": model_name(model),
        "d_in": d_in,
        "tokenizer_vocabulary": len(tokenizer),
        "corpus_sha256": corpus,
    }


@dataclass
class _Run:
    """What one `train_sae` call shares across its layers."""

    model: object
    tokenizer: object
    config: SAETrainConfig
    output_dir: Path
    fingerprint: dict
    train_chunks: list
    held_chunks: list
    progress: bool
    data_description: str
    counts: dict

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return pad if pad is not None else (getattr(self.tokenizer, "eos_token_id", None) or 0)

    def layer_dir(self, layer: int) -> Path:
        return self.output_dir / f"layer_{layer}"

    def _check(self, saved: dict, layer: int, what: str) -> None:
        differences = [
            f"{key}: {saved.get(key)!r} there, {value!r} now"
            for key, value in self.fingerprint.items()
            if saved.get(key) != value
        ]
        if differences:
            raise CaftError(
                f"{self.layer_dir(layer)} holds a {what} trained with other settings "
                f"({'; '.join(differences)}). Use the same settings to resume, another "
                "--output-dir, or delete that folder to start over."
            )

    def finished_result(self, layer: int) -> SAETrainResult | None:
        path = self.layer_dir(layer) / METRICS_FILE
        if not path.is_file():
            return None
        saved = read_json(path)
        self._check(saved.get("fingerprint", {}), layer, "finished SAE")
        sae = load_sae(self.layer_dir(layer) / "caft")
        steps = self.config.steps
        return SAETrainResult(layer, self.layer_dir(layer), steps, steps, sae, saved["metrics"])

    def checkpoint_step(self, layer: int) -> int:
        path = self.layer_dir(layer) / CHECKPOINT_DIR / CHECKPOINT_JSON
        if not path.is_file():
            return 0
        saved = read_json(path)
        self._check(saved.get("fingerprint", {}), layer, "checkpoint")
        return int(saved["step"])

    # -- training a group of layers that are at the same step --
    def train_group(self, layers: list[int], stop_after_steps: int | None) -> dict:
        config, device = self.config, model_device(self.model)
        d_in = hidden_size(self.model)
        stream = ActivationStream(
            self.model, self.train_chunks, layers, pad_id=self.pad_id,
            model_batch_size=config.model_batch_size,
            buffer_rows=min(config.buffer_rows, config.total_tokens),  # no point holding more
            seed=config.seed,
        )  # fmt: skip
        trainers = {
            layer: SAETrainer(d_in, config, seed=config.seed * 1000 + layer, device=device)
            for layer in layers
        }
        step, spent, first = self._start(layers, stream, trainers)
        logs = {layer: _Log(self.layer_dir(layer) / LOG_FILE, step) for layer in layers}
        clock = _Clock(**spent)
        end = (
            config.steps if stop_after_steps is None else min(config.steps, step + stop_after_steps)
        )
        threshold_from = min(int(config.threshold_start * config.steps), config.steps - 1)
        bar = tqdm(
            total=config.steps, initial=step, desc=f"SAE layers {layers}", disable=not self.progress
        )
        try:
            while step < end:
                batch = first if first is not None else stream.next_batch(config.batch_size)
                first = None
                lr = learning_rate_at(step, config)
                rows = {
                    layer: trainer.step(batch[layer], lr, record_threshold=step >= threshold_from)
                    for layer, trainer in trainers.items()
                }
                step += 1
                for layer, row in rows.items():
                    logs[layer].write({"step": step, "tokens": step * config.batch_size, **row})
                bar.update(1)
                bar.set_postfix(fve=" ".join(f"{r['fve']:.3f}" for r in rows.values()))
                if step % config.checkpoint_every == 0 or step == end:
                    self._save_checkpoints(step, clock.spent(), stream, trainers, logs)
        finally:
            bar.close()
            for log in logs.values():
                log.close()
        spent = clock.spent()
        if step < config.steps:
            return {
                layer: SAETrainResult(layer, self.layer_dir(layer), step, config.steps)
                for layer in layers
            }
        return self._finish(layers, trainers, stream, spent)

    def _start(self, layers, stream, trainers) -> tuple[int, dict, dict | None]:
        """(step, time already spent, first batch when starting fresh) after loading or
        initialising the trainers and the stream."""
        path = self.layer_dir(layers[0]) / CHECKPOINT_DIR
        if (path / CHECKPOINT_JSON).is_file():
            buffers, info = {}, {}
            for layer in layers:
                folder = self.layer_dir(layer) / CHECKPOINT_DIR
                tensors = load_file(str(folder / CHECKPOINT_TENSORS))
                info = read_json(folder / CHECKPOINT_JSON)
                trainers[layer].load_state(tensors, info["trainer"])
                buffers[layer] = tensors["buffer"]
                rng_state = tensors["rng_state"]
            stream.load_state(buffers, rng_state, info["stream"])
            return int(info["step"]), info["seconds"], None
        first = stream.next_batch(self.config.batch_size)
        for layer, trainer in trainers.items():
            trainer.initialise(first[layer])
        return 0, {"wall": 0.0, "cpu": 0.0}, first

    def _save_checkpoints(self, step, spent: dict, stream, trainers, logs) -> None:
        for layer, trainer in trainers.items():
            logs[layer].flush()
            tensors, trainer_info = trainer.state()
            stream_tensors, stream_info = stream.state(layer)
            tensors = {
                name: t.detach().cpu().contiguous()
                for name, t in {**tensors, **stream_tensors}.items()
            }
            info = {
                "step": step,
                "steps": self.config.steps,
                "tokens_seen": step * self.config.batch_size,
                "seconds": spent,
                "trainer": trainer_info,
                "stream": stream_info,
                "fingerprint": self.fingerprint,
            }
            with atomic_write_dir(self.layer_dir(layer) / CHECKPOINT_DIR) as tmp:
                save_file(tensors, str(tmp / CHECKPOINT_TENSORS))
                (tmp / CHECKPOINT_JSON).write_text(json.dumps(info, indent=2))

    def _finish(self, layers, trainers, stream, spent: dict) -> dict[int, SAETrainResult]:
        config = self.config
        saes = {
            layer: trainer.to_sae(hook_layer=layer, metadata={})
            for layer, trainer in trainers.items()
        }
        metrics = sae_metrics(
            self.model, saes, self.held_chunks, pad_id=self.pad_id, progress=self.progress
        )
        results = {}
        for layer, sae in saes.items():
            trainer = trainers[layer]
            metrics[layer].update(
                layer=layer,
                architecture=config.architecture,
                width=config.width,
                k=config.k,
                dead_fraction=float(trainer.dead_mask().float().mean()),
                tokens_trained=config.steps * config.batch_size,
                steps=config.steps,
                epochs=stream.rows_read / max(1, stream.rows_per_epoch),
                training_seconds=spent["wall"],
                training_cpu_seconds=spent["cpu"],
                input_scale=trainer.input_scale,
                threshold=None if sae.threshold is None else float(sae.threshold),
                **self.counts,
            )
            sae.metadata = self._metadata(layer, trainer, metrics[layer])
            folder = self.layer_dir(layer)
            sae.save(folder / "caft")
            sae.save_saelens(folder / "saelens")
            write_json(
                folder / METRICS_FILE, {"metrics": metrics[layer], "fingerprint": self.fingerprint}
            )
            shutil.rmtree(folder / CHECKPOINT_DIR, ignore_errors=True)
            saved = load_sae(folder / "caft")
            results[layer] = SAETrainResult(
                layer, folder, config.steps, config.steps, saved, metrics[layer], trained_now=True
            )
        return results

    def _metadata(self, layer: int, trainer: SAETrainer, metrics: dict) -> dict:
        return {
            "model_name": self.fingerprint["model"],
            "hook_name": f"blocks.{layer}.hook_resid_post",
            "trained_by": "caft.discovery.sae.train",
            "training": {
                **self.config.settings(),
                "layer": layer,
                "lr": self.config.learning_rate(),
            },
            "input_scale_folded": trainer.input_scale,
            "data": self.data_description,
            "corpus_sha256": self.fingerprint["corpus_sha256"],
            "metrics": metrics,
        }


class _Clock:
    """Wall-clock and CPU (process) time of training, continuing a resumed run's."""

    def __init__(self, wall: float, cpu: float):
        self.wall, self.cpu = wall - time.perf_counter(), cpu - time.process_time()

    def spent(self) -> dict:
        return {"wall": self.wall + time.perf_counter(), "cpu": self.cpu + time.process_time()}


class _Log:
    """The per-step loss curve (JSON lines). On resume, rows past the checkpoint are dropped:
    those steps are trained again."""

    def __init__(self, path: Path, step: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.handle = path.open("a")

    def write(self, row: dict) -> None:
        self.handle.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def _step_of(line: str) -> float:
    """The step of a log line; a line torn by a crash counts as past any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


# ---- results files -----------------------------------------------------------------------------
def _write_results(output_dir: Path) -> None:
    """results.json / results.md over every finished layer in `output_dir`."""
    layers = {}
    for path in sorted(output_dir.glob(f"layer_*/{METRICS_FILE}")):
        saved = read_json(path)
        layers[int(saved["metrics"]["layer"])] = saved
    if not layers:
        return
    ordered = dict(sorted(layers.items()))
    first = next(iter(ordered.values()))["fingerprint"]
    write_json(
        output_dir / RESULTS_JSON,
        {
            "model": first["model"],
            "layers": {str(layer): saved["metrics"] for layer, saved in ordered.items()},
            "settings": {str(layer): saved["fingerprint"] for layer, saved in ordered.items()},
        },
    )
    atomic_write_text(output_dir / RESULTS_MD, results_table(ordered, first["model"]))


def results_table(layers: dict[int, dict], model: str) -> str:
    header = (
        f"# SAEs trained on {model}\n\n"
        "FVE, L0 and losses on held-out documents; CE = next-token loss (nats) clean, with the "
        "SAE spliced in, and with the layer zero-ablated; recovered = (zero - spliced) / "
        "(zero - clean).\n\n"
        "| layer | arch | width | k | FVE | L0 | dead | CE clean | CE spliced | CE zero | "
        "recovered | tokens | seconds |\n|" + "---|" * 13 + "\n"
    )
    lines = []
    for layer, saved in layers.items():
        m = saved["metrics"]
        lines.append(
            f"| {layer} | {m['architecture']} | {m['width']} | {m['k']} | {m['fve']:.3f} | "
            f"{m['mean_l0']:.1f} | {m['dead_fraction']:.3f} | {m['ce_loss_clean']:.3f} | "
            f"{m['ce_loss_spliced']:.3f} | {m['ce_loss_zero_ablated']:.3f} | "
            f"{m['ce_loss_recovered']:.3f} | {m['tokens_trained']} | {m['training_seconds']:.0f} |"
        )
    return header + "\n".join(lines) + "\n"


def summary_line(result: SAETrainResult) -> str:
    """One line per layer for the CLI."""
    if not result.finished:
        return f"layer {result.layer}: stopped at step {result.step}/{result.steps} (resumable)"
    m = result.metrics
    return (
        f"layer {result.layer}: FVE {m['fve']:.3f}, L0 {m['mean_l0']:.1f}, dead "
        f"{m['dead_fraction']:.1%}, CE {m['ce_loss_clean']:.3f} clean / "
        f"{m['ce_loss_spliced']:.3f} spliced / {m['ce_loss_zero_ablated']:.3f} zero-ablated "
        f"({m['ce_loss_recovered']:.1%} recovered), {m['tokens_trained']} tokens, "
        f"{m['training_seconds']:.0f} s ({m['training_cpu_seconds']:.0f} s CPU)"
    )


def parse_layers(text: str) -> list[int]:
    """'3,9,15' (or '3 9 15') -> [3, 9, 15], with a clear error for anything else."""
    parts = [part for part in text.replace(",", " ").split() if part]
    try:
        layers = [int(part) for part in parts]
    except ValueError:
        raise CaftError(
            f"--layers {text!r}: expected comma-separated integers, e.g. 3,9,15."
        ) from None
    if not layers:
        raise CaftError("--layers is empty: name the decoder layers, e.g. 3,9,15.")
    return layers
