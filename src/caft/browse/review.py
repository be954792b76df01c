"""A discovery run under review in `caft browse`: what is known about each candidate, the current
selection and notes, and the save that writes them.

The run folder is what `caft discover` (candidates/), `caft select` / `caft autointerp`
(selection.json, autointerp.json) or a `caft demo` seed (discovery/candidates, selection.json) left.
A save writes RUN_DIR/selection.json in the format of `caft.selection.write_selection_file` (rule
"manual (caft browse)", one row per candidate with its note and scores) and the chosen ConceptSet in
RUN_DIR/selected, so `caft train --ablate RUN_DIR/selection.json` (or `RUN_DIR/selected`) takes it.
The selection file of another rule is kept once, as selection.before-browse.json.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from caft.concepts import SIDECAR_FILE, ConceptSet, direction_id, parse_direction_id
from caft.errors import CaftError
from caft.io import atomic_write_text, read_json
from caft.selection import SELECTION_FORMAT, apply_selection, write_selection_file

from .windows import CorpusViews

logger = logging.getLogger(__name__)

RULE = "manual (caft browse)"
SELECTION_FILE = "selection.json"
BACKUP_FILE = "selection.before-browse.json"
SELECTED_DIR = "selected"
AUTOINTERP_FILE = "autointerp.json"
MAX_NOTE_CHARS = 10_000

SCORE_HELP = {  # in the order the page shows them
    "discovery": "the discovery method's score",
    "contrast": "contrast rule: min over contrast sets of |Cohen's d| / the random-direction null "
    "(> 1 passes)",
    "embedding": "offline scorer: sentence-embedding similarity of the top windows to the "
    "description / the random-snippet null (> 1 passes)",
    "autointerp": "autointerp: the LLM's relevance to the concept, 0-100",
    "score": "the selection rule's score",
}


@dataclass
class CandidateFacts:
    """What earlier steps said about a candidate: scores by label, an explanation, details."""

    scores: dict[str, float | None] = field(default_factory=dict)
    explanation: str = ""
    details: dict = field(default_factory=dict)


@dataclass
class ReviewRow:
    """One candidate's row in the selection file written by `caft browse`."""

    id: str
    layer: int
    candidate_index: int
    selected: bool
    note: str
    scores: dict[str, float | None]
    explanation: str = ""
    details: dict = field(default_factory=dict)


def find_candidates(run_dir: str | Path, candidates: str | Path | None = None) -> Path:
    """The candidates folder of a run: `candidates` if given, else RUN_DIR/candidates,
    RUN_DIR/discovery/candidates, or the folder RUN_DIR/selection.json names."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CaftError(
            f"{run_dir}: no such folder. Pass the output folder of `caft discover pca`, "
            "`caft select` or `caft autointerp`, or a `caft demo` seed folder."
        )
    if candidates is not None:
        if not (Path(candidates) / SIDECAR_FILE).is_file():
            raise CaftError(f"--candidates {candidates}: not a concept set (no {SIDECAR_FILE}).")
        return Path(candidates)
    named = _selection_data(run_dir / SELECTION_FILE) or {}
    options = [run_dir / "candidates", run_dir / "discovery" / "candidates"]
    if named.get("candidates"):
        options.append(Path(named["candidates"]))
    for option in options:
        if (option / SIDECAR_FILE).is_file():
            return option
    if (run_dir / SIDECAR_FILE).is_file():
        raise CaftError(
            f"{run_dir} is a concept set itself: pass the run folder that holds it (the selection "
            f"is written there), or `--candidates {run_dir}` with a run folder of your choice."
        )
    looked = ", ".join(str(option) for option in options)
    raise CaftError(
        f"{run_dir}: no candidates found (looked in {looked}). Pass a run folder of `caft "
        "discover`, `caft select`, `caft autointerp` or a `caft demo` seed, or --candidates DIR."
    )


def _selection_data(path: Path) -> dict | None:
    """A selection file's contents, or None when there is none or it is unreadable."""
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError) as error:
        logger.warning("browse: ignoring unreadable %s (%s)", path, error)
        return None
    return data if isinstance(data, dict) and data.get("format") == SELECTION_FORMAT else None


def read_facts(run_dir: Path, concepts: ConceptSet) -> dict[str, CandidateFacts]:
    """Scores and explanations from the candidates, selection.json and autointerp.json."""
    facts = {
        info.id: CandidateFacts(scores={} if info.score is None else {"discovery": info.score})
        for info in concepts.infos
    }
    selection = _selection_data(run_dir / SELECTION_FILE) or {}
    rows = list(selection.get("scores") or [])
    # CandidateScore rows come from the contrast rule or the embedding scorer: the rule says which.
    rule_label = (
        "embedding" if str(selection.get("rule", "")).startswith("embedding") else "contrast"
    )
    autointerp = run_dir / AUTOINTERP_FILE
    if autointerp.is_file():
        try:
            rows += list(read_json(autointerp).get("results") or [])
        except (OSError, ValueError, AttributeError) as error:
            logger.warning("browse: ignoring unreadable %s (%s)", autointerp, error)
    for row in rows:
        if isinstance(row, dict) and row.get("id") in facts:
            _merge_row(facts[row["id"]], row, rule_label)
    return facts


def _merge_row(facts: CandidateFacts, row: dict, rule_label: str) -> None:
    """Read a row of any selection rule: caft browse's own, autointerp's, the contrast rule's or
    the embedding scorer's (`rule_label`)."""
    if "note" in row and isinstance(row.get("scores"), dict):  # a ReviewRow
        facts.scores |= {k: v for k, v in row["scores"].items() if k != "discovery"}
        facts.explanation = row.get("explanation") or facts.explanation
        facts.details |= row.get("details") or {}
    elif "score_kind" in row:  # autointerp's Interpretation
        facts.scores["autointerp"] = row.get("score")
        facts.explanation = row.get("explanation") or ""
        facts.details["autointerp score kind"] = row.get("score_kind")
    elif "by_set" in row:  # a CandidateScore
        facts.scores[rule_label] = row.get("score")
        for name, numbers in (row.get("by_set") or {}).items():
            if isinstance(numbers, dict):
                shown = ", ".join(f"{key} {value}" for key, value in numbers.items())
                facts.details[f"{rule_label} {name}"] = shown
    elif isinstance(row.get("score"), (int, float)):  # another rule: keep its number
        facts.scores["score"] = row["score"]


@dataclass
class ReviewState:
    """The saved selection as the page shows it."""

    selected: list[str]
    notes: dict[str, str]
    rule: str
    file: str
    saved_at: str | None
    backup: str | None
    warnings: list[str] = field(default_factory=list)


class Review:
    """One run under review: the data the page shows, the saved state, and the save itself."""

    def __init__(
        self, run_dir: str | Path, candidates_dir: str | Path, concepts: ConceptSet,
        views: CorpusViews,
    ):  # fmt: skip
        self.run_dir = Path(run_dir)
        self.candidates_dir = Path(candidates_dir)
        self.concepts = concepts
        self.views = views
        self.facts = read_facts(self.run_dir, concepts)
        self.ids = concepts.ids()
        self._lock = threading.Lock()

    @property
    def selection_path(self) -> Path:
        return self.run_dir / SELECTION_FILE

    def candidates_payload(self) -> dict:
        """Everything the page lists: run information and every candidate with its views."""
        provenance = self.concepts.provenance
        found = {label for facts in self.facts.values() for label in facts.scores}
        labels = [label for label in SCORE_HELP if label in found] + sorted(found - set(SCORE_HELP))
        help_texts = SCORE_HELP | {
            "discovery": provenance.extra.get("score", SCORE_HELP["discovery"])
        }
        return {
            "run": {
                "dir": str(self.run_dir.resolve()),
                "candidates": str(self.candidates_dir.resolve()),
                "model": provenance.model,
                "method": provenance.method,
                "data": provenance.data,
                "corpus": self.views.corpus_note,
                "n_documents": self.views.n_documents,
                "n_tokens": self.views.n_tokens,
                "layers": self.concepts.layers,
                "scores": {label: help_texts.get(label, label) for label in labels},
            },
            "candidates": [self._candidate(info) for info in self.concepts.infos],
        }

    def _candidate(self, info) -> dict:
        facts = self.facts[info.id]
        windows = self.views.windows.get(info.id, {})
        histogram = self.views.histograms.get(info.id)
        return {
            "id": info.id,
            "layer": info.layer,
            "index": info.candidate_index,
            "scores": facts.scores,
            "explanation": facts.explanation,
            "details": facts.details,
            "windows": {
                side: [asdict(w) for w in windows.get(side, [])] for side in ("top", "bottom")
            },
            "histogram": asdict(histogram) if histogram is not None else None,
        }

    def state(self) -> dict:
        """The selection and notes on disk now (what a reload shows)."""
        return asdict(self._read_state())

    def _read_state(self) -> ReviewState:
        path = self.selection_path
        data = _selection_data(path)
        backup = self.run_dir / BACKUP_FILE
        state = ReviewState([], {}, "", str(path), None, str(backup) if backup.is_file() else None)
        if data is None:
            if path.is_file():
                state.warnings.append(
                    f"{path.name} is not a readable selection file; Save keeps it as {BACKUP_FILE}."
                )
            return state
        state.rule = str(data.get("rule", ""))
        state.saved_at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime))
        known = set(self.ids)
        for raw in data.get("selected") or []:
            try:
                cid = direction_id(*parse_direction_id(str(raw)))
            except CaftError:
                cid = str(raw)
            if cid in known:
                state.selected.append(cid)
            else:
                state.warnings.append(f"{path.name} selects {raw}, which is not a candidate here.")
        for row in data.get("scores") or []:
            if isinstance(row, dict) and row.get("note") and row.get("id") in known:
                state.notes[row["id"]] = str(row["note"])
        return state

    def save(self, payload) -> dict:
        """Validate `{"selected": [ids], "notes": {id: text}}` and write the selection file and the
        selected set; returns the new state. Bad input raises CaftError and writes nothing."""
        selected, notes = self.validate(payload)
        with self._lock:
            previous = _selection_data(self.selection_path)
            # Any file but browse's own is kept once: another rule's, or one a person broke.
            if self.selection_path.is_file() and (previous or {}).get("rule") != RULE:
                atomic_write_text(self.run_dir / BACKUP_FILE, self.selection_path.read_text())
            chosen = apply_selection(self.concepts, selected, rule=RULE)
            for info in chosen.infos:
                info.note = notes.get(info.id, "")
            chosen.save(self.run_dir / SELECTED_DIR)
            write_selection_file(
                self.selection_path,
                selected=selected,
                rule=RULE,
                candidates_path=str(self.candidates_dir.resolve()),
                scores=[self._row(info, selected, notes) for info in self.concepts.infos],
                settings={"tool": "caft browse", "previous": self._previous_selection()},
            )
        logger.info("browse: saved %d selected to %s", len(selected), self.selection_path)
        return self.state()

    def _previous_selection(self) -> dict | None:
        """The rule and ids of the selection file browse replaced first (kept as a backup)."""
        backup = _selection_data(self.run_dir / BACKUP_FILE)
        if backup is None:
            return None
        return {"file": BACKUP_FILE, "rule": backup.get("rule"), "selected": backup.get("selected")}

    def _row(self, info, selected: list[str], notes: dict[str, str]) -> ReviewRow:
        facts = self.facts[info.id]
        return ReviewRow(
            id=info.id,
            layer=info.layer,
            candidate_index=info.candidate_index,
            selected=info.id in selected,
            note=notes.get(info.id, ""),
            scores=facts.scores,
            explanation=facts.explanation,
            details=facts.details,
        )

    def validate(self, payload) -> tuple[list[str], dict[str, str]]:
        """(selected ids in the candidates' order, non-empty notes by id) from a posted payload."""
        shape = 'expected {"selected": ["L3.0", ...], "notes": {"L3.0": "text", ...}}'
        if not isinstance(payload, dict):
            raise CaftError(f"Bad selection: {shape}.")
        selected, notes = payload.get("selected"), payload.get("notes", {})
        if not isinstance(selected, list) or not all(isinstance(i, str) for i in selected):
            raise CaftError(f'Bad selection: "selected" must be a list of ids; {shape}.')
        if not isinstance(notes, dict) or not all(isinstance(v, str) for v in notes.values()):
            raise CaftError(f'Bad selection: "notes" must map ids to text; {shape}.')
        selected_ids = {self._known_id(cid) for cid in selected}
        notes = {self._known_id(cid): text for cid, text in notes.items() if text.strip()}
        too_long = [cid for cid, text in notes.items() if len(text) > MAX_NOTE_CHARS]
        if too_long:
            raise CaftError(
                f"The note on {', '.join(too_long)} is longer than {MAX_NOTE_CHARS} characters."
            )
        if not selected_ids:
            raise CaftError(
                "Nothing is selected: select at least one candidate before saving (an empty set "
                "cannot be ablated)."
            )
        return [cid for cid in self.ids if cid in selected_ids], notes

    def _known_id(self, text: str) -> str:
        cid = direction_id(*parse_direction_id(text))
        if cid not in self.facts:
            raise CaftError(
                f"Unknown candidate {text!r}: this run has {len(self.ids)} candidates, "
                f"{self.ids[0]} … {self.ids[-1]} (layers {', '.join(map(str, self.concepts.layers))})."
            )
        return cid


def model_cache_key(name: str | Path | None) -> str:
    """How the cache of windows names a model: its source, plus for a local file or folder its
    resolved path and modification time (a model re-saved in place then invalidates the cache)."""
    from caft.models import describe_model_source

    if name is None:
        return describe_model_source(None)
    path = Path(name).expanduser()
    if not path.exists():
        return str(name)  # a Hub id
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.is_file()]
    newest = max((p.stat().st_mtime for p in files), default=path.stat().st_mtime)
    return f"{path.resolve()} (modified {newest:.0f})"


def open_review(
    run_dir: str | Path,
    *,
    candidates: str | Path | None = None,
    model: str | Path | None = None,
    loaded: tuple | None = None,
    corpus: str | Path | None = None,
    n_examples: int = 20,
    progress: bool = True,
) -> Review:
    """Everything `caft browse` serves for a run folder. The windows and histograms come from
    RUN_DIR/browse_windows.json when it matches; otherwise `model` (a name for `load_model`, None
    for the embedded one) is loaded to compute them, or `loaded` ((model, tokenizer) already in
    memory, named by `model` in the cache key) is used."""
    from caft.displays import DEFAULT_CORPUS_NOTE, load_corpus
    from caft.models import load_model

    from .windows import load_or_compute_views

    candidates_dir = find_candidates(run_dir, candidates)
    concepts = ConceptSet.load(candidates_dir)
    documents = load_corpus(corpus)
    views = load_or_compute_views(
        run_dir, concepts, documents,
        model_key=model_cache_key(model) if loaded is None else f"in memory: {model}",
        get_model=(lambda: loaded) if loaded is not None else (lambda: load_model(model)),
        corpus_note=str(corpus) if corpus else DEFAULT_CORPUS_NOTE,
        n_examples=n_examples, progress=progress,
    )  # fmt: skip
    return Review(run_dir, candidates_dir, concepts, views)
