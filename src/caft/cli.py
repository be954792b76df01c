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
        "--max-per-layer", type=int, default=3, help="Contrast rule: cap per layer."
    )
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

        model, tokenizer = load_model(args.model)
        scores = score_candidates(
            candidates, model, tokenizer, load_concept_description(args.contrast)
        )
        chosen = select_by_contrast(scores, max_per_layer=args.max_per_layer)
        rule = f"contrast-rule ({Path(args.contrast).name})"
        if not chosen:
            raise CaftError("No candidate beats the random-direction null on every contrast set.")
    selected = apply_selection(candidates, chosen, rule=rule, scores=scores)
    write_selection_file(
        output_dir / "selection.json", selected=chosen, rule=rule,
        candidates_path=str(Path(args.candidates).resolve()), scores=scores,
    )  # fmt: skip
    selected.save(output_dir / "selected")
    print(
        f"Selected {', '.join(chosen)}\n{output_dir / 'selection.json'}\n{output_dir / 'selected'}"
    )


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


if __name__ == "__main__":
    raise SystemExit(main())
