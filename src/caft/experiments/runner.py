"""`caft experiment`: a grid of tasks × methods × seeds, each run a resumable unit with its own folder.

Layout of an experiment folder:

    OUTPUT/experiment.json                     the settings (a resume with other settings is refused)
    OUTPUT/shared/<task>/seed_<s>/             steps several methods reuse, each computed once:
        plain/result.json, plain/model/          base-model and plain fine-tune evaluations, model
        candidates/                              PCA of (plain − base) activations
        selection.json, selected/                the contrast rule's choice (no OOD data)
        sae_candidates/, sae_selection.json, sae_selected/   the same from SAE latents (caft_sae)
        locks/<step>.lock                        held while a process computes that step
    OUTPUT/runs/<task>/<method>/seed_<s>/      one run: config.json, log.txt, metrics.json
                                               (written last: "finished"), error.txt on failure
    OUTPUT/results.csv, report.md, *.png       the grid report (`caft.experiments.grid_report`)

A run is finished when its `metrics.json` exists; re-running skips it. A folder without one (killed
mid-run, or failed: `error.txt` holds the traceback) is redone. Shared steps are guarded by an
exclusive `fcntl.flock` on a lock file: two processes never compute the same step, and a lock dies
with its process, so there are no stale locks. With `parallel > 1` the runs execute as
`caft run-one RUN_FOLDER` subprocesses, each with cores / parallel torch threads; the same command is
what a cluster scheduler launches, one run per job (`caft experiment CONFIG --plan` prints them).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import gc
import logging
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from caft.config import changed_settings
from caft.errors import CaftError
from caft.experiments.methods import (
    METHODS,
    ablated_rows_from_training,
    best_candidate,
    check_sae_entries,
    combine_scores,
    contrast_description_from_rows,
    get_method,
)
from caft.io import atomic_write_text, read_json, write_json

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
ERROR_FILE = "error.txt"
LOG_FILE = "log.txt"
WORKER_OUTPUT_FILE = "worker_output.txt"
EXPERIMENT_FILE = "experiment.json"
ALL_DOUBLE_MC = "double_mc:all"
# Shared folders per discovery source: candidates, the selection step (its file: <step>.json) and
# the selected directions.
CANDIDATE_FOLDERS = {"pca": "candidates", "sae": "sae_candidates"}
SELECTION_STEPS = {"pca": "selection", "sae": "sae_selection"}
SELECTED_FOLDERS = {"pca": "selected", "sae": "sae_selected"}
ID_SPLIT = {"gender": "id", "double_mc": "val"}
OOD_SPLIT = {"gender": "ood", "double_mc": "test"}


# ---- configuration ---------------------------------------------------------------------------
@dataclass
class ExperimentConfig:
    """A grid of tasks × methods × seeds and the settings every run shares (a YAML file)."""

    name: str = field(default="experiment", metadata={"help": "A title for the report."})
    output_dir: str = field(
        default="caft-runs/experiment", metadata={"help": "Where runs and the report go."}
    )
    model: str | None = field(
        default=None, metadata={"help": "Model (Hub id, folder, .gguf); default: embedded SmolLM2."}
    )
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda."})
    tasks: list = field(
        default_factory=lambda: ["gender"],
        metadata={
            "help": "'gender', a double-MC setting such as 'verbs|SENTIMENT' (intended in capitals), "
            f"'{ALL_DOUBLE_MC}' (the paper's 16), or a mapping {{setting, rows_a, rows_b}} / "
            "{gender: {templates, professions}} for your own data."
        },
    )
    methods: list = field(
        default_factory=lambda: ["none", "caft_pca", "random"],
        metadata={"help": f"Methods: {', '.join(METHODS)}."},
    )
    seeds: list = field(
        default_factory=lambda: [0, 1, 2],
        metadata={
            "help": "Seeds (a list, or a count n for 0..n-1); a seed fixes data and training."
        },
    )
    steps: int = field(default=100, metadata={"help": "Optimizer steps per fine-tune."})
    epochs: float = field(
        default=0.0,
        metadata={
            "help": "If > 0: steps = epochs × training examples / batch_size (overrides steps)."
        },
    )
    batch_size: int = field(default=16, metadata={"help": "Examples per optimizer step."})
    micro_batch_size: int = field(
        default=0, metadata={"help": "Examples per forward pass (0: batch_size)."}
    )
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate (AdamW)."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Warm-up steps / total steps."})
    lr_scheduler: str = field(default="linear", metadata={"help": "transformers scheduler name."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2 (paper: 0.95)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    bf16: str = field(default="auto", metadata={"help": "bf16 autocast: auto, yes, no."})
    fewer_steps_fraction: float = field(
        default=0.5, metadata={"help": "fewer_steps: this fraction of the steps."}
    )
    n_eval: int = field(
        default=240, metadata={"help": "Prompts per evaluation split, at most (0: all)."}
    )
    eval_batch_size: int = field(default=32, metadata={"help": "Prompts per evaluation pass."})
    n_max: int = field(default=2000, metadata={"help": "Double MC: question pairs, at most."})
    n_train: int = field(
        default=0, metadata={"help": "Gender: training prompts (0: steps × batch_size)."}
    )
    train_templates: int = field(
        default=0, metadata={"help": "Gender: training templates, half per category (0: all)."}
    )
    professions: str = field(
        default="doctor,nurse", metadata={"help": "Gender: 'MALE,FEMALE', 'all' or a JSON file."}
    )
    pca_layers: list | None = field(
        default=None, metadata={"help": "Layers for PCA discovery (default: all)."}
    )
    n_components: int = field(default=10, metadata={"help": "PCs kept per layer."})
    pca_sequences: int = field(default=256, metadata={"help": "Training prompts used for PCA."})
    pca_batch_size: int = field(default=16, metadata={"help": "Sequences per PCA forward pass."})
    max_per_layer: int = field(default=3, metadata={"help": "Selected directions per layer."})
    contrast_texts: int = field(
        default=100, metadata={"help": "Double MC: texts per pole of the rows' contrast sets."}
    )
    n_random_null: int = field(
        default=200, metadata={"help": "Random directions in the selection's null."}
    )
    saes: list = field(
        default_factory=list,
        metadata={
            "help": "caft_sae: one SAE per layer; a folder, Hub id or SAELens release, or "
            "{source, sae_id, layer}."
        },
    )
    sae_top_per_ranking: int = field(
        default=20, metadata={"help": "caft_sae: candidates = union of each ranking's top N."}
    )
    baseline_k: int = field(
        default=1, metadata={"help": "top_k / random_orthonormal: directions per layer."}
    )
    prefix_tokens: int = field(
        default=-1,
        metadata={"help": "Un-ablated leading tokens; -1: the prompts' shared prefix; 0: none."},
    )
    threads: int = field(
        default=0, metadata={"help": "torch threads per run (0: cores / parallel workers)."}
    )
    min_id_accuracy: float = field(
        default=0.9,
        metadata={
            "help": "Report: runs below this ID accuracy did not learn the training task and are "
            "also compared without them."
        },
    )
    keep_models: bool = field(
        default=False,
        metadata={
            "help": "Keep every fine-tuned model (disk!); otherwise only metrics, and the shared "
            "plain model is deleted once all runs of its task and seed are finished."
        },
    )

    def validate(self) -> None:
        if not self.tasks:
            raise CaftError("The experiment config lists no tasks.")
        if not self.methods:
            raise CaftError("The experiment config lists no methods.")
        for name in self.methods:
            get_method(name)
        if len(set(self.methods)) != len(self.methods):
            raise CaftError(f"methods lists a method twice: {self.methods}.")
        self.seed_list()
        for name in ("batch_size", "n_components", "pca_sequences", "max_per_layer", "baseline_k"):
            if getattr(self, name) < 1:
                raise CaftError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.epochs <= 0 and self.steps < 1:
            raise CaftError(f"steps must be at least 1 (or set epochs), got {self.steps}.")
        if not 0 < self.fewer_steps_fraction < 1:
            raise CaftError(
                f"fewer_steps_fraction must be in (0, 1), got {self.fewer_steps_fraction}."
            )
        if not 0 <= self.warmup_ratio < 1:
            raise CaftError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise CaftError(f"device must be auto, cpu or cuda, got {self.device!r}.")
        parse_tasks(self.tasks)
        check_sae_entries(self.saes)

    def seed_list(self) -> list[int]:
        seeds = self.seeds
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            seeds = list(range(seeds))
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise CaftError(f"seeds must be a list of integers or a count, got {self.seeds!r}.")
        if len(set(seeds)) != len(seeds):
            raise CaftError(f"seeds lists a seed twice: {seeds}.")
        return seeds


# Settings that do not change any run's results: an experiment may be resumed or extended with
# other values (more seeds, methods or tasks; another number of threads).
RESUME_NEUTRAL = (
    "name", "output_dir", "tasks", "methods", "seeds", "threads", "keep_models", "min_id_accuracy",
)  # fmt: skip
# Settings read by some methods only: they may change until a run of one of those methods has
# started (e.g. add caft_sae and its SAEs to a finished PCA grid).
METHOD_SETTINGS = {
    "saes": ("caft_sae",),
    "sae_top_per_ranking": ("caft_sae",),
    "baseline_k": ("top_k", "random_orthonormal"),
    "fewer_steps_fraction": ("fewer_steps",),
}


def load_experiment_config(path: str | Path, **overrides) -> ExperimentConfig:
    """Read a YAML experiment config; `overrides` (e.g. output_dir) replace its values."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise CaftError(f"Cannot read the experiment config {path}: {error}") from error
    if not isinstance(values, dict):
        raise CaftError(f"{path}: expected a mapping of setting: value.")
    values = {key.replace("-", "_"): value for key, value in values.items()}
    known = {f.name for f in dataclasses.fields(ExperimentConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CaftError(
            f"{path}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}."
        )
    values |= {key: value for key, value in overrides.items() if value is not None}
    try:
        config = ExperimentConfig(**values)
    except TypeError as error:
        raise CaftError(f"{path}: {error}") from error
    config.validate()
    return config


# ---- tasks and runs ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    """One row of the results table: the gender task or a double-MC setting, with its data."""

    kind: str  # "gender" or "double_mc"
    name: str  # "gender" or the canonical setting, e.g. "verbs|SENTIMENT"
    rows_a: str | None = None  # double MC: the user's rows for the first / second question
    rows_b: str | None = None
    templates: str | None = None  # gender: the user's templates CSV
    professions: str | None = None

    @property
    def slug(self) -> str:
        """A folder name, distinct even on case-insensitive file systems."""
        if self.kind == "gender":
            return "gender"
        from caft.tasks.double_mc import parse_setting

        setting = parse_setting(self.name)
        return f"{setting.first}-{setting.second}.intended-{setting.intended}"


def parse_tasks(entries: Sequence) -> list[TaskSpec]:
    """Task specs from the config's `tasks` list (see `ExperimentConfig.tasks`)."""
    from caft.tasks.double_mc import SETTINGS, parse_setting

    tasks: list[TaskSpec] = []
    for index, entry in enumerate(entries):
        where = f"tasks[{index}]"
        if entry == ALL_DOUBLE_MC:
            tasks += [TaskSpec("double_mc", name) for name in SETTINGS]
        elif entry == "gender":
            tasks.append(TaskSpec("gender", "gender"))
        elif isinstance(entry, str):
            tasks.append(TaskSpec("double_mc", _setting_name(entry, where, parse_setting)))
        elif isinstance(entry, dict) and "gender" in entry:
            options = entry["gender"] or {}
            _check_keys(options, {"templates", "professions"}, where)
            tasks.append(TaskSpec("gender", "gender", **options))
        elif isinstance(entry, dict) and "setting" in entry:
            _check_keys(entry, {"setting", "rows_a", "rows_b"}, where)
            name = _setting_name(entry["setting"], where, parse_setting)
            tasks.append(TaskSpec("double_mc", name, entry.get("rows_a"), entry.get("rows_b")))
        else:
            raise CaftError(
                f"{where}: {entry!r} is not a task; write 'gender', a setting such as "
                f"'verbs|SENTIMENT', '{ALL_DOUBLE_MC}', or {{setting: ..., rows_a: ..., rows_b: ...}}."
            )
    slugs = [task.slug for task in tasks]
    repeated = sorted({slug for slug in slugs if slugs.count(slug) > 1})
    if repeated:
        raise CaftError(f"tasks lists the same task twice: {', '.join(repeated)}.")
    return tasks


def _setting_name(text: str, where: str, parse_setting) -> str:
    try:
        return parse_setting(text).name
    except CaftError as error:
        raise CaftError(f"{where}: {error}") from None


def _check_keys(mapping: dict, allowed: set[str], where: str) -> None:
    if not isinstance(mapping, dict):
        raise CaftError(f"{where}: expected a mapping, got {mapping!r}.")
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise CaftError(f"{where}: unknown key(s) {unknown}; use {sorted(allowed)}.")


@dataclass(frozen=True)
class RunSpec:
    """One (task, method, seed) unit of an experiment."""

    task: TaskSpec
    method: str
    seed: int

    @property
    def run_id(self) -> str:
        return f"{self.task.slug}/{self.method}/seed_{self.seed}"

    def run_dir(self, root: Path) -> Path:
        return Path(root) / "runs" / self.run_id

    def shared_dir(self, root: Path) -> Path:
        return Path(root) / "shared" / self.task.slug / f"seed_{self.seed}"


def plan_runs(config: ExperimentConfig) -> list[RunSpec]:
    """Every run of the grid, seed by seed, those needing the most shared steps first in each seed.

    Seed by seed, so a grid stopped early holds whole seeds (every setting and method) to report.
    Within a seed a pool working through the list in order computes each (task, seed)'s shared
    steps in its first run, and the later runs find them done instead of waiting for them.
    """
    tasks = parse_tasks(config.tasks)
    order = list(METHODS)
    runs = [
        RunSpec(task, method, seed)
        for method in config.methods
        for task in tasks
        for seed in config.seed_list()
    ]
    return sorted(
        runs,
        key=lambda run: (run.seed, get_method(run.method).rank, order.index(run.method)),
    )


def run_status(run_dir: Path) -> str:
    """finished (metrics.json), failed (error.txt), broken (started, no result), or pending."""
    run_dir = Path(run_dir)
    if (run_dir / METRICS_FILE).is_file():
        return "finished"
    if (run_dir / ERROR_FILE).is_file():
        return "failed"
    if (run_dir / LOG_FILE).is_file():
        return "broken"
    return "pending"


# ---- locks and shared steps -------------------------------------------------------------------
@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) while the block runs.

    fcntl.flock: the operating system releases it when the process ends, however it ends, so a
    killed worker leaves no stale lock. Advisory, between caft processes only. Where fcntl does not
    exist (Windows) this does not lock: run one worker at a time there.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for %s (another process holds it)", path)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"pid {os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


def ensure_shared_step(
    folder: str | Path, step: str, is_done: Callable[[], bool], compute: Callable[[], object]
) -> bool:
    """Run `compute` unless `is_done()`, under the step's lock. True if this process computed it.

    `compute` must leave `is_done()` true by writing its marker last (atomically); the check is
    repeated after taking the lock, so of two processes that find the step missing only the first
    computes it and the second reuses the result.
    """
    if is_done():
        return False
    with file_lock(Path(folder) / "locks" / f"{step}.lock"):
        if is_done():
            return False
        compute()
    if not is_done():
        raise CaftError(f"Shared step {step!r} in {folder} finished without writing its result.")
    return True


# ---- one run ----------------------------------------------------------------------------------
_BASE_MODELS: dict[tuple[str | None, str], tuple] = {}


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CaftError("device: cuda, but torch sees no CUDA GPU; use device: auto or cpu.")
    return name


def _load_base(model: str | None, device: str):
    """The base model, loaded once per process (fine-tunes work on deep copies of it)."""
    from caft.models import load_model

    key = (model, device)
    if key not in _BASE_MODELS:
        _BASE_MODELS.clear()  # one base model in memory at a time
        _BASE_MODELS[key] = load_model(model, device=device)
    return _BASE_MODELS[key]


class RunContext:
    """What a method sees of its run: data, models and the shared steps, each made on first use."""

    def __init__(self, spec: RunSpec, settings: ExperimentConfig, root: Path, *, progress: bool):
        self.spec = spec
        self.settings = settings
        self.seed = spec.seed
        self.task = spec.task
        self.run_dir = spec.run_dir(root)
        self.shared_dir = spec.shared_dir(root)
        self.progress = progress
        self.device = _device(settings.device)
        self.shared_computed: dict[str, float] = {}  # shared steps this process computed: seconds
        self._splits = None
        self._prefix: int | None = None
        self._plain_model = None
        self._candidates: dict[str, object] = {}  # by source: pca, sae
        self._selection: dict[str, object] = {}

    # ---- data and models ------------------------------------------------------------------------
    @property
    def base(self):
        return _load_base(self.settings.model, self.device)

    @property
    def base_model(self):
        return self.base[0]

    @property
    def tokenizer(self):
        return self.base[1]

    @property
    def splits(self):
        if self._splits is None:
            self._splits = make_splits(self.task, self.settings, self.seed)
        return self._splits

    @property
    def prefix_tokens(self) -> int:
        if self._prefix is None:
            from caft.ablation import common_prefix_length
            from caft.batching import encode_prompts

            if self.settings.prefix_tokens >= 0:
                self._prefix = self.settings.prefix_tokens
            else:
                prompts = [example.prompt for example in self.splits.train]
                self._prefix = common_prefix_length(encode_prompts(self.tokenizer, prompts))
        return self._prefix

    def total_steps(self) -> int:
        if self.settings.epochs > 0:
            n_train = len(self.splits.train)
            return max(1, math.ceil(self.settings.epochs * n_train / self.settings.batch_size))
        return self.settings.steps

    def train_config(self, steps: int | None = None):
        from caft.training import TrainConfig

        s = self.settings
        steps = steps or self.total_steps()
        return TrainConfig(
            max_steps=steps,
            batch_size=s.batch_size,
            micro_batch_size=s.micro_batch_size or s.batch_size,
            learning_rate=s.learning_rate,
            warmup_steps=round(s.warmup_ratio * steps),
            lr_scheduler=s.lr_scheduler,
            weight_decay=s.weight_decay,
            adam_beta1=s.adam_beta1,
            adam_beta2=s.adam_beta2,
            max_grad_norm=s.max_grad_norm,
            bf16=s.bf16,
            seed=self.seed,
            logging_steps=max(1, steps // 10),
        )

    def model_description(self) -> str:
        from caft.models import describe_model_source

        return describe_model_source(self.settings.model)

    def d_model(self) -> int:
        from caft.models import hidden_size

        return hidden_size(self.base_model)

    def discovery_layers(self) -> list[int]:
        from caft.models import find_decoder_layers

        n_layers = len(find_decoder_layers(self.base_model))
        layers = self.settings.pca_layers
        return sorted(layers) if layers is not None else list(range(n_layers))

    # ---- shared steps ---------------------------------------------------------------------------
    def _shared(self, step: str, is_done: Callable[[], bool], compute: Callable[[], object]):
        start = time.perf_counter()
        if ensure_shared_step(self.shared_dir, step, is_done, compute):
            self.shared_computed[step] = round(time.perf_counter() - start, 1)

    def base_result(self) -> dict:
        """The base model's evaluation (the reference row of the report)."""
        path = self.shared_dir / "base_eval.json"

        def compute() -> None:
            write_json(path, self.evaluate(self.base_model))

        self._shared("base", path.is_file, compute)
        return read_json(path)

    def plain_result(self, *, need_model: bool = False) -> dict:
        """The plain fine-tune's evaluation (and its model on disk, if asked for)."""
        folder = self.shared_dir / "plain"

        def is_done() -> bool:
            has_model = (folder / "model").is_dir()
            return (folder / "result.json").is_file() and (has_model or not need_model)

        self._shared("plain", is_done, self._compute_plain)
        return read_json(folder / "result.json")

    def _compute_plain(self) -> None:
        from caft.training import train

        folder = self.shared_dir / "plain"
        logger.info("%s seed %d: plain fine-tune", self.task.name, self.seed)
        config = self.train_config()
        result = train(
            copy.deepcopy(self.base_model), self.tokenizer, self.splits.train, config,
            output_dir=folder, progress=self.progress,
        )  # fmt: skip
        self._plain_model = result.model
        write_json(
            folder / "result.json",
            {
                "plain": self.evaluate(result.model),
                "train": _train_summary(config, result),
                "data": self.splits.description,
            },
        )

    def plain_model(self):
        if self._plain_model is None:
            from caft.models import load_model

            self.plain_result(need_model=True)
            if self._plain_model is None:
                self._plain_model, _ = load_model(
                    self.shared_dir / "plain" / "model", device=self.device
                )
        return self._plain_model

    def candidates(self, source: str = "pca"):
        """Candidate directions of the plain fine-tune: PCA components or SAE latents."""
        from caft.concepts import ConceptSet

        if source not in self._candidates:
            folder = self.shared_dir / CANDIDATE_FOLDERS[source]
            compute = self._compute_candidates if source == "pca" else self._compute_sae_candidates
            self._shared(CANDIDATE_FOLDERS[source], folder.is_dir, compute)
            self._candidates[source] = ConceptSet.load(folder)
        return self._candidates[source]

    def _compute_candidates(self) -> None:
        from caft.batching import encode_prompts
        from caft.discovery.pca import PCAConfig, discover_pca

        s = self.settings
        prompts = [example.prompt for example in self.splits.train[: s.pca_sequences]]
        candidates = discover_pca(
            self.base_model, self.plain_model(), self.tokenizer,
            encode_prompts(self.tokenizer, prompts),
            start_positions=max(1, self.prefix_tokens),
            config=PCAConfig(
                layers=self.discovery_layers(), n_components=s.n_components,
                batch_size=s.pca_batch_size, max_sequences=s.pca_sequences,
            ),
            data_description=self._discovery_data(len(prompts)),
            progress=self.progress,
        )  # fmt: skip
        candidates.save(self.shared_dir / CANDIDATE_FOLDERS["pca"])

    def _compute_sae_candidates(self) -> None:
        from caft.discovery.sae.rank import discover_sae
        from caft.experiments.methods import load_experiment_saes

        s = self.settings
        examples = self.splits.train[: s.pca_sequences]
        candidates = discover_sae(
            self.base_model, self.plain_model(), self.tokenizer, examples,
            load_experiment_saes(s.saes), top_per_ranking=s.sae_top_per_ranking,
            start_positions=max(1, self.prefix_tokens), batch_size=s.pca_batch_size,
            max_sequences=s.pca_sequences, data_description=self._discovery_data(len(examples)),
            progress=self.progress,
        )  # fmt: skip
        candidates.save(self.shared_dir / CANDIDATE_FOLDERS["sae"])

    def _discovery_data(self, n_prompts: int) -> str:
        return (
            f"{self.task.name} training prompts ({n_prompts}), positions after the "
            f"{self.prefix_tokens}-token shared prefix; plain fine-tune of "
            f"{self.model_description()}, seed {self.seed}"
        )

    def selection(self, source: str = "pca"):
        """CAFT's directions: the candidates the contrast rule keeps (no OOD data)."""
        from caft.concepts import ConceptSet

        if source not in self._selection:
            folder = self.shared_dir / SELECTED_FOLDERS[source]
            self._shared(SELECTION_STEPS[source], folder.is_dir, lambda: self._select(source))
            self._selection[source] = ConceptSet.load(folder)
        return self._selection[source]

    def _select(self, source: str) -> None:
        from caft.selection import (
            apply_selection,
            score_candidates,
            select_by_contrast,
            write_selection_file,
        )

        candidates = self.candidates(source)
        description, combine, origin = self.concept_description()
        scores = score_candidates(
            candidates, self.base_model, self.tokenizer, description,
            n_random=self.settings.n_random_null, seed=self.seed, progress=self.progress,
        )  # fmt: skip
        scores = combine_scores(scores, combine)
        chosen = select_by_contrast(scores, max_per_layer=self.settings.max_per_layer)
        fallback = not chosen
        if fallback:  # nothing beats random directions: keep the single best candidate
            chosen = [best_candidate(scores)]
            logger.warning("No candidate beat the random-direction null; using %s", chosen)
        rule = (
            f"contrast-rule ({origin}; beats the 99th pct of random directions on {combine} sets)"
        )
        write_selection_file(
            self.shared_dir / f"{SELECTION_STEPS[source]}.json", selected=chosen, rule=rule,
            candidates_path=str(self.shared_dir / CANDIDATE_FOLDERS[source]), scores=scores,
            settings={
                "max_per_layer": self.settings.max_per_layer, "n_random": self.settings.n_random_null,
                "quantile": 0.99, "combine": combine, "fallback_to_best": fallback,
                "contrast_sets": {c.name: {p: len(t) for p, t in c.poles.items()}
                                  for c in description.contrast_sets},
            },
        )  # fmt: skip
        selected = apply_selection(candidates, chosen, rule=rule, scores=scores)
        selected.save(self.shared_dir / SELECTED_FOLDERS[source])

    def concept_description(self):
        """(ConceptDescription, how to combine its sets, where it came from) of the ablated concept."""
        from caft.selection import load_concept_description

        if self.task.kind == "gender":
            from caft.tasks.gender import default_contrast_path

            path = default_contrast_path()
            return load_concept_description(path), "all", path.name
        subtask, rows = ablated_rows_from_training(self.splits.train)
        description, combine = contrast_description_from_rows(
            subtask, rows, max_per_pole=self.settings.contrast_texts, seed=self.seed
        )
        return description, combine, f"{subtask} training rows grouped by answer"

    # ---- evaluation and training ----------------------------------------------------------------
    def evaluate(self, model, concepts=None, *, hooks_on: bool = False) -> dict:
        """ID and OOD accuracy (hooks off, or on with `hooks_on`), plus hook dependence."""
        from caft.evaluation import compare_hooks, evaluate_mc

        kwargs = dict(batch_size=self.settings.eval_batch_size, progress=self.progress)
        results, comparisons = {}, {}
        for split, examples in self.splits.eval_sets.items():
            if concepts is None:
                results[split] = evaluate_mc(model, self.tokenizer, examples, **kwargs)
                continue
            comparison = compare_hooks(
                model, self.tokenizer, examples, concepts, prefix_tokens=self.prefix_tokens,
                **kwargs,
            )  # fmt: skip
            comparisons[split] = comparison
            results[split] = comparison.hooks_on if hooks_on else comparison.hooks_off
        return evaluation_summary(self.task.kind, results, comparisons, hooks_on=hooks_on)

    def record_plain(self) -> dict:
        result = self.plain_result()
        return {**result["plain"], "train": result["train"], "directions": None}

    def train_and_evaluate(self, concepts, *, steps: int | None = None) -> dict:
        """Fine-tune a copy of the base model (with `concepts` ablated) and evaluate it."""
        from caft.training import train

        self._release_plain()
        config = self.train_config(steps)
        keep = self.settings.keep_models
        result = train(
            copy.deepcopy(self.base_model), self.tokenizer, self.splits.train, config,
            concepts=concepts, prefix_tokens=self.prefix_tokens,
            output_dir=self.run_dir if keep else None, progress=self.progress,
        )  # fmt: skip
        summary = _train_summary(config, result)
        if not keep:
            write_json(self.run_dir / "training.json", summary | {"log": result.log_history})
            if concepts is not None:
                concepts.save(self.run_dir / "ablated_concepts")
        metrics = self.evaluate(result.model, concepts)
        del result
        return metrics | {"train": summary, "directions": describe_directions(concepts)}

    def evaluate_plain_with_hooks(self, concepts) -> dict:
        """The plain model with `concepts` ablated at evaluation (hooks on): test-time ablation."""
        concepts.save(self.run_dir / "ablated_concepts")
        metrics = self.evaluate(self.plain_model(), concepts, hooks_on=True)
        return metrics | {
            "train": self.plain_result()["train"],
            "directions": describe_directions(concepts),
        }

    def _release_plain(self) -> None:
        if self._plain_model is not None:
            self._plain_model = None
            gc.collect()


def make_splits(task: TaskSpec, settings: ExperimentConfig, seed: int):
    """The task's training data and its ID / OOD evaluation sets for `seed`."""
    if task.kind == "gender":
        from caft.tasks.gender import load_templates, make_gender_splits, resolve_professions

        n_train = settings.n_train or settings.steps * settings.batch_size
        return make_gender_splits(
            load_templates(task.templates),
            resolve_professions(task.professions or settings.professions),
            n_train=n_train,
            n_eval=settings.n_eval or None,
            train_templates=settings.train_templates or None,
            seed=seed,
        )
    from caft.tasks.double_mc import load_rows, make_double_mc

    splits = make_double_mc(
        task.name,
        load_rows(task.rows_a) if task.rows_a else None,
        load_rows(task.rows_b) if task.rows_b else None,
        n_max=settings.n_max,
        seed=seed,
    )
    if settings.n_eval:
        splits.eval_sets = {k: v[: settings.n_eval] for k, v in splits.eval_sets.items()}
    return splits


def evaluation_summary(kind: str, results: dict, comparisons: dict, *, hooks_on: bool) -> dict:
    """The flat numbers the report reads, from per-split MCResults (and hook comparisons).

    ood_unintended_accuracy: the share of OOD items answered with the unintended cue's answer (the
    ablated question's letter in double MC, the stereotyped pronoun in the gender task).
    """
    id_split, ood_split = ID_SPLIT[kind], OOD_SPLIT[kind]
    ood = results[ood_split]
    summary = {
        "id_split": id_split,
        "ood_split": ood_split,
        "id_accuracy": results[id_split].accuracy,
        "ood_accuracy": ood.accuracy,
        # two options: an OOD item not answered by the intended cue is answered by the other one
        "ood_unintended_accuracy": round(1 - ood.accuracy, 4),
        "n_id": results[id_split].n,
        "n_ood": ood.n,
        "evaluated_with_hooks": hooks_on,
        "accuracy_by_category": {split: r.accuracy_by_category for split, r in results.items()},
        "hooks": None,
    }
    if comparisons:
        summary["hooks"] = {
            split: {
                "hooks_off_accuracy": c.hooks_off.accuracy,
                "hooks_on_accuracy": c.hooks_on.accuracy,
                "mean_kl_on_vs_off": c.mean_kl,
                "answer_flip_rate": c.answer_flip_rate,
            }
            for split, c in comparisons.items()
        }
    return summary


def describe_directions(concepts) -> dict | None:
    if concepts is None:
        return None
    return {
        "n": len(concepts),
        "count_by_layer": {str(k): v for k, v in concepts.count_by_layer().items()},
        "ids": concepts.ids(),
        "method": concepts.provenance.method,
        "selection": concepts.provenance.selection,
    }


def _train_summary(config, result) -> dict:
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    return {
        "steps": config.max_steps,
        "learning_rate": config.learning_rate,
        "seconds": round(result.seconds, 1),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
    }


def run_config(spec: RunSpec, config: ExperimentConfig) -> dict:
    """What `config.json` of a run holds: enough to run it alone (`caft run-one RUN_FOLDER`)."""
    return {
        "format": "caft.run",
        "run_id": spec.run_id,
        "task": asdict(spec.task),
        "method": spec.method,
        "seed": spec.seed,
        "settings": asdict(config),
    }


def read_run_config(run_dir: Path) -> tuple[RunSpec, ExperimentConfig, Path]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CaftError(
            f"{run_dir} is not a run folder: no {CONFIG_FILE} (made by `caft experiment`; "
            "`caft experiment CONFIG.yaml --plan` writes every run's folder without running it)."
        )
    data = read_json(path)
    if data.get("format") != "caft.run":
        raise CaftError(f"{path}: not a caft run config.")
    spec = RunSpec(TaskSpec(**data["task"]), data["method"], data["seed"])
    root = Path(run_dir).resolve().parents[3]
    return spec, ExperimentConfig(**data["settings"]), root


def execute_run(run_dir: str | Path, *, threads: int = 0, progress: bool = True) -> str:
    """Run one unit unless it is finished. Returns finished, skipped or failed; never raises for a
    failure of the run itself (its traceback goes to error.txt) so the other runs go on."""
    run_dir = Path(run_dir)
    spec, settings, root = read_run_config(run_dir)
    if threads:
        import torch

        torch.set_num_threads(threads)
    with file_lock(run_dir / ".lock"):  # a second process on the same run waits, then skips
        if run_status(run_dir) == "finished":
            return "skipped"
        with _run_log(run_dir / LOG_FILE):
            return _execute_locked(spec, settings, root, run_dir, progress)


def _execute_locked(spec, settings, root, run_dir: Path, progress: bool) -> str:
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    logger.info("run %s: start (pid %d)", spec.run_id, os.getpid())
    start = time.perf_counter()
    context = RunContext(spec, settings, root, progress=progress)
    try:
        metrics = get_method(spec.method).run(context)
        base = context.base_result()
    except Exception as error:  # one run's failure must not stop the grid
        atomic_write_text(run_dir / ERROR_FILE, traceback.format_exc())
        logger.error("run %s failed: %s (see %s)", spec.run_id, error, run_dir / ERROR_FILE)
        return "failed"
    metrics = {
        "format": "caft.run_metrics",
        "run_id": spec.run_id,
        "task": spec.task.name,
        "task_kind": spec.task.kind,
        "intended": _side(spec.task, "intended"),
        "ablated": _side(spec.task, "ablated"),
        "method": spec.method,
        "seed": spec.seed,
        **metrics,
        "base": {"id_accuracy": base["id_accuracy"], "ood_accuracy": base["ood_accuracy"]},
        "shared_steps_computed_here": context.shared_computed,
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_json(run_dir / METRICS_FILE, metrics)  # last: marks the run finished
    logger.info(
        "run %s: finished in %.0f s (ID %.3f, OOD %.3f)",
        spec.run_id, metrics["seconds"], metrics["id_accuracy"], metrics["ood_accuracy"],
    )  # fmt: skip
    return "finished"


def _side(task: TaskSpec, which: str) -> str:
    if task.kind == "gender":
        return {"intended": "grammatical case", "ablated": "profession gender"}[which]
    from caft.tasks.double_mc import parse_setting

    return getattr(parse_setting(task.name), which)


@contextlib.contextmanager
def _run_log(path: Path) -> Iterator[None]:
    """Send caft's log records to the run's log file while it runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    caft_logger = logging.getLogger("caft")
    previous_level = caft_logger.level
    if caft_logger.getEffectiveLevel() > logging.INFO:
        caft_logger.setLevel(logging.INFO)
    caft_logger.addHandler(handler)
    try:
        yield
    finally:
        caft_logger.removeHandler(handler)
        caft_logger.setLevel(previous_level)
        handler.close()


# ---- the grid ---------------------------------------------------------------------------------
@dataclass
class ExperimentSummary:
    output_dir: Path
    statuses: dict[str, str]  # run id -> finished / skipped / failed / ...
    seconds: float
    report: dict = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(1 for value in self.statuses.values() if value == status)


def prepare_experiment(config: ExperimentConfig) -> list[RunSpec]:
    """Check the folder may hold this config, record it, and write every run's config.json."""
    config.validate()
    root = Path(config.output_dir)
    check_resumable(root, config)
    runs = plan_runs(config)
    write_json(root / EXPERIMENT_FILE, asdict(config) | {"run_ids": [r.run_id for r in runs]})
    for spec in runs:
        path = spec.run_dir(root) / CONFIG_FILE
        data = run_config(spec, config)
        if not path.is_file() or read_json(path) != data:
            write_json(path, data)
    return runs


def check_resumable(root: Path, config: ExperimentConfig) -> None:
    """Refuse to mix runs made with other settings into one experiment folder."""
    unused = tuple(
        name
        for name, methods in METHOD_SETTINGS.items()
        if not any(_method_started(Path(root), method) for method in methods)
    )
    details = changed_settings(Path(root) / EXPERIMENT_FILE, config, RESUME_NEUTRAL + unused)
    if details:
        raise CaftError(
            f"{root} holds an experiment with other settings ({details}). Resume it with the same "
            "settings (tasks, methods and seeds may change, and a method's own settings until "
            "one of its runs has started), or use another output_dir."
        )


def _method_started(root: Path, method: str) -> bool:
    """Whether any run of `method` in the experiment folder has started (left a log or result)."""
    return any(
        (run_dir / name).exists()
        for run_dir in root.glob(f"runs/*/{method}/seed_*")
        for name in (LOG_FILE, METRICS_FILE, ERROR_FILE)
    )


def select_runs(runs: list[RunSpec], only: Sequence[str] | None) -> list[RunSpec]:
    """The runs whose id matches one of `only` (shell patterns, e.g. 'gender/*/seed_0')."""
    if not only:
        return runs
    chosen = [r for r in runs if any(fnmatch.fnmatchcase(r.run_id, p) for p in only)]
    unmatched = [p for p in only if not any(fnmatch.fnmatchcase(r.run_id, p) for r in runs)]
    if unmatched:
        examples = ", ".join(r.run_id for r in runs[:3])
        raise CaftError(
            f"--only {' '.join(unmatched)}: no run of this experiment matches; run ids look like "
            f"{examples} (shell patterns such as '*/caft_pca/*' work)."
        )
    return chosen


def run_experiment(
    config: ExperimentConfig,
    *,
    parallel: int = 1,
    only: Sequence[str] | None = None,
    progress: bool = True,
) -> ExperimentSummary:
    """Run every unfinished run of the grid (in `parallel` worker processes), then the report."""
    from caft.experiments.grid_report import write_grid_report

    if parallel < 1:
        raise CaftError(f"--parallel must be at least 1, got {parallel}.")
    start = time.perf_counter()
    root = Path(config.output_dir)
    runs = select_runs(prepare_experiment(config), only)
    statuses = {r.run_id: "skipped" for r in runs if run_status(r.run_dir(root)) == "finished"}
    todo = [r for r in runs if r.run_id not in statuses]
    logger.info(
        "%d runs: %d finished already, %d to do (parallel %d)",
        len(runs), len(statuses), len(todo), parallel,
    )  # fmt: skip
    threads = config.threads or max(1, (os.cpu_count() or 1) // parallel)
    if parallel == 1:
        statuses |= _run_in_process(todo, root, threads=threads, progress=progress)
    else:
        statuses |= run_pool(
            [r.run_dir(root) for r in todo], parallel=parallel, threads=threads, progress=progress
        )
    remove_finished_plain_models(config)
    report = write_grid_report(root)
    return ExperimentSummary(root, statuses, round(time.perf_counter() - start, 1), report)


def _run_in_process(todo: list[RunSpec], root: Path, *, threads: int, progress: bool) -> dict:
    statuses = {}
    bar = _progress_bar(len(todo), progress)
    for spec in todo:
        bar.set_postfix_str(spec.run_id)
        statuses[spec.run_id] = execute_run(spec.run_dir(root), threads=threads, progress=progress)
        bar.update()
    bar.close()
    return statuses


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="experiment: runs", unit="run", disable=not enabled)


def worker_command(run_dir: Path, threads: int) -> list[str]:
    """The command that runs one unit: also what a cluster scheduler launches."""
    return [sys.executable, "-m", "caft", "run-one", str(run_dir), "--threads", str(threads)]


def run_pool(
    run_dirs: Sequence[Path], *, parallel: int, threads: int, progress: bool = True
) -> dict[str, str]:
    """Run each folder as a `caft run-one` subprocess, at most `parallel` at a time, in order."""
    environment = os.environ | {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    pending = list(run_dirs)
    running: dict[subprocess.Popen, tuple[Path, object]] = {}
    statuses: dict[str, str] = {}
    bar = _progress_bar(len(pending), progress)
    try:
        while pending or running:
            while pending and len(running) < parallel:
                run_dir = Path(pending.pop(0))
                output = (run_dir / WORKER_OUTPUT_FILE).open("a", encoding="utf-8")
                command = [*worker_command(run_dir, threads), "--no-progress"]
                process = subprocess.Popen(
                    command, stdout=output, stderr=subprocess.STDOUT, env=environment
                )
                running[process] = (run_dir, output)
            time.sleep(0.2)
            for process in [p for p in running if p.poll() is not None]:
                run_dir, output = running.pop(process)
                output.close()
                statuses[_run_id(run_dir)] = _worker_status(run_dir, process.returncode)
                bar.update()
    finally:
        _stop_workers(running)
        bar.close()
    return statuses


def _run_id(run_dir: Path) -> str:
    return str(read_json(Path(run_dir) / CONFIG_FILE)["run_id"])


def _worker_status(run_dir: Path, returncode: int) -> str:
    status = run_status(run_dir)
    if status == "finished":
        return "finished"
    if status != "failed":  # killed or crashed without a Python traceback
        atomic_write_text(
            run_dir / ERROR_FILE,
            f"The worker process exited with code {returncode} without finishing the run; its "
            f"output is in {WORKER_OUTPUT_FILE}.\n",
        )
    return "failed"


def _stop_workers(running: dict) -> None:
    """On interruption: stop the workers (their runs stay unfinished and are redone next time)."""
    for process in running:
        process.terminate()
    for process, (_, output) in running.items():
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        output.close()


def remove_finished_plain_models(config: ExperimentConfig) -> list[Path]:
    """Unless keep_models: delete each shared plain model whose task and seed have all runs done."""
    if config.keep_models:
        return []
    root = Path(config.output_dir)
    by_shared: dict[Path, list[RunSpec]] = {}
    for spec in plan_runs(config):
        by_shared.setdefault(spec.shared_dir(root), []).append(spec)
    removed = []
    for shared_dir, specs in by_shared.items():
        model = shared_dir / "plain" / "model"
        if model.is_dir() and all(run_status(s.run_dir(root)) == "finished" for s in specs):
            with file_lock(shared_dir / "locks" / "plain.lock"):
                shutil.rmtree(model, ignore_errors=True)
            removed.append(model)
    return removed


def describe_methods() -> str:
    """One line per method, for help texts."""
    return "\n".join(f"{m.name}: {m.description}" for m in METHODS.values())
