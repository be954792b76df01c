"""ConceptSet: per-layer orthonormal bases of concept directions, with provenance.

A ConceptSet is what discovery produces (candidates), what selection narrows, and what ablation
removes. On disk it is a folder: `directions.safetensors` (one `[k, d_model]` float32 tensor per
layer, rows orthonormal) and `concepts.json` (provenance and one record per direction).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from caft.errors import CaftError
from caft.io import atomic_write_dir

TENSORS_FILE = "directions.safetensors"
SIDECAR_FILE = "concepts.json"
FORMAT_VERSION = 1


@dataclass
class DirectionInfo:
    """What is known about one direction: where it came from and why it is here."""

    layer: int
    candidate_index: (
        int  # index in the discovery run's candidate list at this layer (e.g. PC number)
    )
    score: float | None = None  # discovery score (e.g. explained variance ratio)
    selection_score: float | None = None  # the selection rule's score, if any
    selected_by: str | None = None  # "contrast-rule", "human", "random-control", ...
    note: str = ""

    @property
    def id(self) -> str:
        return direction_id(self.layer, self.candidate_index)


def direction_id(layer: int, candidate_index: int) -> str:
    """The name a person uses for a candidate: 'L<layer>.<index>', e.g. 'L3.0'."""
    return f"L{layer}.{candidate_index}"


def parse_direction_id(text: str) -> tuple[int, int]:
    """Parse 'L3.0' (or '3.0' / '3:0') into (layer, index)."""
    cleaned = text.strip().upper().removeprefix("L").replace(":", ".")
    try:
        layer, index = cleaned.split(".")
        return int(layer), int(index)
    except ValueError:
        raise CaftError(
            f"Bad direction id {text!r}: expected 'L<layer>.<index>', e.g. 'L3.0'."
        ) from None


@dataclass
class Provenance:
    """Where a set of directions came from. Stored in the JSON sidecar."""

    model: str = ""
    method: str = ""  # "pca", "sae", "random", "manual", ...
    data: str = ""  # what the directions were computed on
    selection: str = ""  # how the directions were chosen from the candidates
    caft_version: str = ""
    created_at: str = ""
    extra: dict = field(default_factory=dict)


class ConceptSet:
    """Orthonormal bases of concept directions per layer, plus provenance.

    Build it from raw directions `{layer: tensor [k, d_model]}`; each layer's rows are
    orthonormalised (QR), so any spanning set works. Rank-deficient or non-finite input is rejected.
    """

    def __init__(
        self,
        directions_by_layer: Mapping[int, torch.Tensor],
        *,
        provenance: Provenance | None = None,
        infos: Iterable[DirectionInfo] | None = None,
    ):
        if not directions_by_layer:
            raise CaftError("A ConceptSet needs at least one layer with at least one direction.")
        self.bases_by_layer: dict[int, torch.Tensor] = {}
        widths = set()
        for layer in sorted(directions_by_layer):
            basis = orthonormalize(directions_by_layer[layer], where=f"layer {layer}")
            self.bases_by_layer[int(layer)] = basis
            widths.add(basis.shape[1])
        if len(widths) != 1:
            raise CaftError(
                f"All layers' directions must have the same width; got {sorted(widths)}."
            )
        self.d_model = widths.pop()
        self.provenance = provenance or Provenance()
        if not self.provenance.created_at:
            self.provenance.created_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if not self.provenance.caft_version:
            from caft import __version__

            self.provenance.caft_version = __version__
        self.infos = list(infos) if infos is not None else self._default_infos()
        self._check_infos()

    # ---- views -------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.bases_by_layer)

    def __len__(self) -> int:
        return sum(basis.shape[0] for basis in self.bases_by_layer.values())

    def count_by_layer(self) -> dict[int, int]:
        return {layer: basis.shape[0] for layer, basis in self.bases_by_layer.items()}

    def ids(self) -> list[str]:
        return [info.id for info in self.infos]

    def infos_at(self, layer: int) -> list[DirectionInfo]:
        return [info for info in self.infos if info.layer == layer]

    def direction(self, direction: str | tuple[int, int]) -> torch.Tensor:
        """One direction (a unit vector) by id ('L3.0') or (layer, candidate_index)."""
        layer, index = parse_direction_id(direction) if isinstance(direction, str) else direction
        for row, info in enumerate(self.infos_at(layer)):
            if info.candidate_index == index:
                return self.bases_by_layer[layer][row]
        raise CaftError(f"No direction {direction_id(layer, index)} in this set ({self.ids()}).")

    def subset(self, ids: Iterable[str | tuple[int, int]], *, selection: str = "") -> ConceptSet:
        """A new set with only the given directions (kept in this set's order).

        The chosen vectors are re-orthonormalised as a group per layer, so the result is a proper
        basis even when the source directions were not mutually orthogonal.
        """
        wanted = {parse_direction_id(i) if isinstance(i, str) else tuple(i) for i in ids}
        known = {(info.layer, info.candidate_index) for info in self.infos}
        missing = sorted(wanted - known)
        if missing:
            names = ", ".join(direction_id(*m) for m in missing)
            raise CaftError(f"Unknown direction(s) {names}; this set has: {', '.join(self.ids())}.")
        if not wanted:
            raise CaftError("Cannot make an empty selection: choose at least one direction.")
        raw: dict[int, list[torch.Tensor]] = {}
        infos = []
        for layer in self.layers:
            for row, info in enumerate(self.infos_at(layer)):
                if (layer, info.candidate_index) in wanted:
                    raw.setdefault(layer, []).append(self.bases_by_layer[layer][row])
                    infos.append(DirectionInfo(**asdict(info)))
        provenance = Provenance(**asdict(self.provenance))
        provenance.selection = selection or provenance.selection
        provenance.created_at = ""
        return ConceptSet(
            {layer: torch.stack(rows) for layer, rows in raw.items()},
            provenance=provenance,
            infos=infos,
        )

    def check_compatible(self, model) -> None:
        """Fail clearly if the model's width or depth does not fit this set."""
        from caft.models import find_decoder_layers, hidden_size

        width = hidden_size(model)
        if width != self.d_model:
            raise CaftError(
                f"These directions have width {self.d_model} but the model's hidden size is {width}: "
                f"they were made for another model ({self.provenance.model or 'unknown'})."
            )
        n_layers = len(find_decoder_layers(model))
        too_deep = [layer for layer in self.layers if not 0 <= layer < n_layers]
        if too_deep:
            raise CaftError(
                f"Directions at layer(s) {too_deep}, but the model has {n_layers} decoder layers "
                f"(0..{n_layers - 1}). Were they made for another model "
                f"({self.provenance.model or 'unknown'})?"
            )

    # ---- persistence -------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write `directions.safetensors` and `concepts.json` into `folder`, atomically."""
        folder = Path(folder)
        tensors = {
            f"layer.{layer}": basis.contiguous() for layer, basis in self.bases_by_layer.items()
        }
        sidecar = {
            "format": "caft.ConceptSet",
            "format_version": FORMAT_VERSION,
            "d_model": self.d_model,
            "count_by_layer": {str(k): v for k, v in self.count_by_layer().items()},
            "provenance": asdict(self.provenance),
            "directions": [asdict(info) | {"id": info.id} for info in self.infos],
        }
        with atomic_write_dir(folder) as tmp:
            save_file(tensors, str(tmp / TENSORS_FILE))
            (tmp / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> ConceptSet:
        folder = Path(folder)
        sidecar_path, tensors_path = folder / SIDECAR_FILE, folder / TENSORS_FILE
        if not sidecar_path.is_file() or not tensors_path.is_file():
            raise CaftError(
                f"{folder} is not a caft concept set: expected {SIDECAR_FILE} and {TENSORS_FILE} "
                "(made by `caft discover` or `caft select`)."
            )
        try:
            sidecar = json.loads(sidecar_path.read_text())
        except json.JSONDecodeError as error:
            raise CaftError(f"{sidecar_path}: invalid JSON ({error}).") from error
        if sidecar.get("format") != "caft.ConceptSet":
            raise CaftError(f"{sidecar_path}: not a caft.ConceptSet sidecar.")
        tensors = load_file(str(tensors_path))
        bases = {int(key.split(".", 1)[1]): value for key, value in tensors.items()}
        infos = [
            DirectionInfo(**{k: v for k, v in d.items() if k != "id"})
            for d in sidecar["directions"]
        ]
        concept_set = cls.__new__(cls)
        concept_set.bases_by_layer = {}
        for layer in sorted(bases):
            _check_finite(bases[layer], where=f"{tensors_path} layer {layer}")
            concept_set.bases_by_layer[layer] = bases[layer].float()
        concept_set.d_model = int(sidecar["d_model"])
        concept_set.provenance = Provenance(**sidecar["provenance"])
        concept_set.infos = infos
        concept_set._check_infos()
        return concept_set

    # ---- internals ---------------------------------------------------------------------------
    def _default_infos(self) -> list[DirectionInfo]:
        return [
            DirectionInfo(layer=layer, candidate_index=i)
            for layer, basis in self.bases_by_layer.items()
            for i in range(basis.shape[0])
        ]

    def _check_infos(self) -> None:
        for layer, count in self.count_by_layer().items():
            if len(self.infos_at(layer)) != count:
                raise CaftError(
                    f"Layer {layer} has {count} directions but {len(self.infos_at(layer))} records."
                )

    def __repr__(self) -> str:
        counts = ", ".join(f"L{layer}: {n}" for layer, n in self.count_by_layer().items())
        return f"ConceptSet({len(self)} directions; {counts}; method={self.provenance.method!r})"


def orthonormalize(directions: torch.Tensor, *, where: str = "", tol: float = 1e-6) -> torch.Tensor:
    """Orthonormal rows spanning the same space as `directions` [k, d], signs kept (diag R > 0).

    Rejects non-finite values and rank-deficient input (a direction that is zero or a combination
    of the others), since ablating it would silently remove less than the user asked for.
    """
    directions = torch.as_tensor(directions).detach().to("cpu", torch.float64)
    if directions.ndim == 1:
        directions = directions[None]
    if directions.ndim != 2 or directions.shape[0] == 0:
        raise CaftError(
            f"{where}: directions must be a [k, d_model] tensor, got {tuple(directions.shape)}."
        )
    _check_finite(directions, where=where)
    if directions.shape[0] > directions.shape[1]:
        raise CaftError(
            f"{where}: {directions.shape[0]} directions exceed the width {directions.shape[1]}."
        )
    q, r = torch.linalg.qr(directions.T)
    diagonal = torch.diagonal(r)
    norms = directions.norm(dim=1)
    if (diagonal.abs() <= tol * norms.max().clamp_min(1e-30)).any() or (norms == 0).any():
        raise CaftError(
            f"{where}: the directions are rank-deficient (one is zero or a combination of the others);"
            " remove the redundant ones."
        )
    q = q * torch.sign(diagonal)
    return q.T.contiguous().to(torch.float32)


def _check_finite(tensor: torch.Tensor, *, where: str) -> None:
    if not torch.isfinite(tensor).all():
        raise CaftError(f"{where}: directions contain NaN or infinite values.")
