"""`caft demo`: the whole CAFT loop on the gender-pronoun task, with a control, per seed.

Per seed: plain fine-tune → PCA of its activation differences from the base → automatic selection
from a written concept description (contrast sets; no OOD data) → CAFT fine-tune from the base with
the selected directions ablated → a control fine-tune ablating random directions (same count, same
layers) → evaluation with hooks off (the deployed model) and on. The plain and CAFT runs share the
recipe (data, steps, learning rate, seed); only the ablation differs.

Every stage writes its artifacts into the seed's folder and is skipped when they exist, so an
interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from caft.ablation import common_prefix_length
from caft.batching import encode_prompts
from caft.concepts import ConceptSet
from caft.discovery.pca import PCAConfig, discover_pca
from caft.displays import DEFAULT_CORPUS_NOTE, collect_windows, load_corpus, render_html, write_html
from caft.errors import CaftError
from caft.evaluation import compare_hooks, evaluate_mc
from caft.experiments.report import write_demo_report
from caft.io import read_json, write_json
from caft.models import describe_model_source, load_model
from caft.selection import (
    apply_selection,
    load_concept_description,
    random_directions_like,
    score_candidates,
    select_by_contrast,
    write_selection_file,
)
from caft.tasks.gender import (
    PAPER_PROFESSIONS,
    PROFESSIONS_HELP,
    default_contrast_path,
    load_templates,
    make_gender_splits,
    resolve_professions,
)
from caft.training import TrainConfig, train

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Options of `caft demo`."""

    model: str | None = field(
        default=None, metadata={"help": "Model (Hub id, folder, .gguf); default: embedded SmolLM2."}
    )
    output_dir: str = field(default="caft-runs/demo", metadata={"help": "Where results go."})
    seeds: int = field(default=1, metadata={"help": "Number of seeds (runs first_seed, +1, ...)."})
    first_seed: int = field(default=0, metadata={"help": "First seed."})
    steps: int = field(default=100, metadata={"help": "Optimizer steps per fine-tune."})
    batch_size: int = field(default=16, metadata={"help": "Examples per step."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate."})
    professions: str = field(default=PAPER_PROFESSIONS, metadata={"help": PROFESSIONS_HELP})
    train_templates: int = field(
        default=0,
        metadata={"help": "Use only this many training templates, half per category (0: all)."},
    )
    n_eval: int = field(default=240, metadata={"help": "Prompts per evaluation split (ID, OOD)."})
    n_components: int = field(default=10, metadata={"help": "PCs kept per layer."})
    pca_sequences: int = field(default=256, metadata={"help": "Training prompts used for PCA."})
    max_per_layer: int = field(
        default=3, metadata={"help": "Selected directions per layer, at most."}
    )
    prefix_tokens: int = field(
        default=-1,
        metadata={"help": "Un-ablated leading tokens; -1: the prompts' shared prefix; 0: none."},
    )
    templates: str | None = field(default=None, metadata={"help": "Templates CSV (text,category)."})
    contrast: str | None = field(
        default=None, metadata={"help": "Concept description JSON (contrast sets)."}
    )
    corpus: str | None = field(default=None, metadata={"help": "Text corpus for the displays."})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: default)."})
    quick: bool = field(
        default=False, metadata={"help": "A few steps and small evaluations: checks the pipeline."}
    )

    def effective(self) -> DemoConfig:
        """The settings actually used (`--quick` shrinks the run)."""
        if not self.quick:
            return self
        return dataclasses.replace(
            self,
            steps=min(self.steps, 6),
            batch_size=min(self.batch_size, 8),
            n_eval=min(self.n_eval, 24),
            pca_sequences=min(self.pca_sequences, 32),
            n_components=min(self.n_components, 3),
        )


def run_demo(config: DemoConfig, *, progress: bool = True) -> dict:
    """Run every seed (skipping finished stages) and write the report. Returns the summary."""
    config = config.effective()
    if config.threads:
        torch.set_num_threads(config.threads)
    output_dir = Path(config.output_dir)
    check_resumable(output_dir, config)
    write_json(output_dir / "demo_config.json", asdict(config))
    start = time.perf_counter()
    base_model, tokenizer = load_model(config.model)
    seed_results = []
    for seed in range(config.first_seed, config.first_seed + config.seeds):
        seed_results.append(run_seed(config, seed, base_model, tokenizer, progress=progress))
    summary = write_demo_report(output_dir, config=asdict(config), seed_results=seed_results)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    write_json(output_dir / "report.json", summary)
    return summary


# Settings that do not change results: a run may be resumed with different values.
RESUME_NEUTRAL = ("output_dir", "seeds", "first_seed", "threads")


def check_resumable(output_dir: Path, config: DemoConfig) -> None:
    """Refuse to mix seeds made with other settings into one report."""
    path = output_dir / "demo_config.json"
    if not path.is_file():
        return
    previous = read_json(path)
    changed = sorted(
        key
        for key, value in asdict(config).items()
        if key not in RESUME_NEUTRAL and key in previous and previous[key] != value
    )
    if changed:
        details = ", ".join(f"{k}: {previous[k]!r} -> {getattr(config, k)!r}" for k in changed)
        raise CaftError(
            f"{output_dir} holds a demo run with other settings ({details}). Resume it with the "
            "same settings, or pass another --output-dir."
        )


def run_seed(config: DemoConfig, seed: int, base_model, tokenizer, *, progress: bool) -> dict:
    seed_dir = Path(config.output_dir) / f"seed_{seed}"
    done_file = seed_dir / "results.json"
    if done_file.is_file():
        logger.info("seed %d: already done (%s)", seed, done_file)
        return read_json(done_file)
    seed_start = time.perf_counter()
    splits = make_gender_splits(
        load_templates(config.templates),
        resolve_professions(config.professions),
        n_train=config.steps * config.batch_size,
        n_eval=config.n_eval,
        train_templates=config.train_templates or None,
        seed=seed,
    )
    train_config = TrainConfig(
        max_steps=config.steps,
        batch_size=config.batch_size,
        micro_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=min(10, max(1, config.steps // 10)),
        seed=seed,
        logging_steps=max(1, config.steps // 10),
    )
    token_lists = encode_prompts(tokenizer, [e.prompt for e in splits.train])
    prefix = common_prefix_length(token_lists) if config.prefix_tokens < 0 else config.prefix_tokens
    stage = _Stages(seed_dir, base_model, tokenizer, splits, train_config, prefix, progress)

    results = {"seed": seed, "prefix_tokens": prefix, "data": splits.description}
    results["base"] = stage.evaluate("base", base_model)
    plain_model = stage.fine_tune("plain", concepts=None)
    results["plain"] = stage.evaluate("plain", plain_model)
    candidates = stage.discover(plain_model, token_lists, config)
    selected = stage.select(candidates, config)
    control = random_directions_like(selected, seed=10_000 + seed)
    results["selected"] = selected.ids()
    results["plain_test_time_ablation"] = stage.evaluate_with_hooks(
        "plain", selected, plain_model, filename="eval_test_time_ablation.json"
    )
    del plain_model
    for name, concepts in (("caft", selected), ("control", control)):
        model = stage.fine_tune(name, concepts=concepts)
        results[name] = stage.evaluate_with_hooks(name, concepts, model)
        del model
    results["seconds"] = round(time.perf_counter() - seed_start, 1)
    write_json(done_file, results)
    return results


class _Stages:
    """The demo's resumable stages for one seed; each writes its output before returning."""

    def __init__(self, seed_dir, base_model, tokenizer, splits, train_config, prefix, progress):
        self.seed_dir = Path(seed_dir)
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.splits = splits
        self.train_config = train_config
        self.prefix = prefix
        self.progress = progress

    def fine_tune(self, name: str, *, concepts: ConceptSet | None):
        run_dir = self.seed_dir / name
        if (run_dir / "training.json").is_file() and (run_dir / "model").is_dir():
            model, _ = load_model(run_dir / "model")
            return model
        logger.info("%s: fine-tuning %s", self.seed_dir.name, name)
        model = copy.deepcopy(self.base_model)
        result = train(
            model, self.tokenizer, self.splits.train, self.train_config,
            concepts=concepts, prefix_tokens=self.prefix, output_dir=run_dir, progress=self.progress,
        )  # fmt: skip
        return result.model

    def evaluate(self, name: str, model) -> dict:
        path = self.seed_dir / name / "eval.json"
        if path.is_file():
            return read_json(path)
        results = {
            split: evaluate_mc(model, self.tokenizer, examples, progress=self.progress).summary()
            for split, examples in self.splits.eval_sets.items()
        }
        write_json(path, results)
        return results

    def evaluate_with_hooks(
        self, name: str, concepts: ConceptSet, model, *, filename: str = "eval.json"
    ) -> dict:
        """Hooks off (deployed) and on, with the hook-dependence diagnostic."""
        path = self.seed_dir / name / filename
        if path.is_file():
            return read_json(path)
        results = {
            split: compare_hooks(
                model,
                self.tokenizer,
                examples,
                concepts,
                prefix_tokens=self.prefix,
                progress=self.progress,
            ).summary()
            for split, examples in self.splits.eval_sets.items()
        }
        write_json(path, results)
        return results

    def discover(self, plain_model, token_lists, config: DemoConfig) -> ConceptSet:
        folder = self.seed_dir / "discovery" / "candidates"
        if folder.is_dir():
            return ConceptSet.load(folder)
        candidates = discover_pca(
            self.base_model, plain_model, self.tokenizer, token_lists[: config.pca_sequences],
            start_positions=max(1, self.prefix),
            config=PCAConfig(n_components=config.n_components),
            data_description=(
                f"gender-pronoun training prompts ({min(len(token_lists), config.pca_sequences)}),"
                f" positions after the {self.prefix}-token shared prefix; plain fine-tune of "
                f"{describe_model_source(config.model)}, seed {self.train_config.seed}"
            ),
            progress=self.progress,
        )  # fmt: skip
        candidates.save(folder)
        return candidates

    def select(self, candidates: ConceptSet, config: DemoConfig) -> ConceptSet:
        folder = self.seed_dir / "selected"
        if folder.is_dir():
            return ConceptSet.load(folder)
        contrast_path = config.contrast or default_contrast_path()
        description = load_concept_description(contrast_path)
        scores = score_candidates(
            candidates, self.base_model, self.tokenizer, description,
            seed=self.train_config.seed, progress=self.progress,
        )  # fmt: skip
        chosen = select_by_contrast(scores, max_per_layer=config.max_per_layer)
        if not chosen:  # nothing beats random directions: fall back to the single best candidate
            chosen = [max(scores, key=lambda s: s.score).id]
            logger.warning(
                "No candidate beat the random-direction null; using the best: %s", chosen
            )
        rule = f"contrast-rule ({Path(contrast_path).name}; beats 99th pct of 200 random dirs)"
        write_selection_file(
            self.seed_dir / "selection.json",
            selected=chosen,
            rule=rule,
            candidates_path=str(self.seed_dir / "discovery" / "candidates"),
            scores=scores,
            settings={"max_per_layer": config.max_per_layer, "n_random": 200, "quantile": 0.99},
        )
        selected = apply_selection(candidates, chosen, rule=rule, scores=scores)
        self._write_display(candidates, set(chosen), {s.id: s.score for s in scores}, config)
        selected.save(folder)
        return selected

    def _write_display(self, candidates, chosen, scores, config: DemoConfig) -> None:
        documents = load_corpus(config.corpus)
        if config.quick:
            documents = documents[:16]
        windows = collect_windows(
            self.base_model, self.tokenizer, documents, candidates, progress=self.progress
        )
        page = render_html(
            candidates,
            windows,
            title=f"CAFT demo, seed {self.train_config.seed}: PCA candidates",
            corpus_note=config.corpus or DEFAULT_CORPUS_NOTE,
            selected=chosen,
            scores=scores,
        )
        write_html(self.seed_dir / "discovery" / "display.html", page)
