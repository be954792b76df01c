"""The report of an experiment grid: a tidy CSV, the paper's table, win counts and figures.

Reads only the run folders (`runs/<task>/<method>/seed_<s>/metrics.json`, `error.txt`) and the
experiment's `experiment.json`, so it can be rebuilt at any time, also while runs are going on:

- `results.csv`: one row per run (finished, failed or missing), one column per number;
- `report.md`: settings × methods, OOD accuracy on the intended question as mean ± s.e.m. over
  seeds with the ID accuracy beside it, as in the paper's tables; in how many settings each CAFT
  method beats the plain fine-tune and each control, and by how much; hook dependence; failures;
- `report.json`: the same numbers for programs;
- `ood_accuracy.png` (grouped bars, error bars = s.e.m., dots = seeds) and `id_vs_ood.png`.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from caft.experiments.methods import METHODS
from caft.io import atomic_write_text, read_json, write_json

CAFT_METHODS = ("caft_pca", "caft_sae")
DEFAULT_MIN_ID_ACCURACY = 0.9  # below it a run did not learn the training task
CSV_COLUMNS = (
    "run_id",
    "task",
    "task_kind",
    "intended",
    "ablated",
    "method",
    "seed",
    "status",
    "id_accuracy",
    "ood_accuracy",
    "ood_unintended_accuracy",
    "base_id_accuracy",
    "base_ood_accuracy",
    "evaluated_with_hooks",
    "hooks_on_id_accuracy",
    "hooks_on_ood_accuracy",
    "mean_kl_ood",
    "answer_flip_rate_ood",
    "n_directions",
    "direction_layers",
    "train_steps",
    "train_seconds",
    "final_loss",
    "seconds",
    "n_id",
    "n_ood",
    "error",
)
METHOD_LABELS = {
    "none": "plain",
    "caft_pca": "CAFT-PCA",
    "caft_sae": "CAFT-SAE",
    "random": "random",
    "top_k": "top-k PCs",
    "random_orthonormal": "random orthonormal",
    "test_time_only": "test-time ablation",
    "fewer_steps": "fewer steps",
}


# ---- collecting -------------------------------------------------------------------------------
def collect_results(root: str | Path) -> list[dict]:
    """One flat row per run: each planned one (finished, failed or not yet run), and each other
    run folder that holds a result (e.g. of a task since dropped from the config)."""
    root = Path(root)
    planned = _planned_run_ids(root)
    found = {
        str(path.parent.relative_to(root / "runs")): path.parent
        for pattern in ("*/*/*/metrics.json", "*/*/*/error.txt")
        for path in sorted((root / "runs").glob(pattern))
    }
    run_ids = planned + sorted(set(found) - set(planned))
    return [_row(root / "runs" / run_id, run_id) for run_id in run_ids]


def _planned_run_ids(root: Path) -> list[str]:
    path = root / "experiment.json"
    return list(read_json(path).get("run_ids", [])) if path.is_file() else []


def _row(run_dir: Path, run_id: str) -> dict:
    row = dict.fromkeys(CSV_COLUMNS)
    task_slug, method, seed = run_id.split("/")
    row |= {"run_id": run_id, "method": method, "seed": int(seed.removeprefix("seed_"))}
    if (run_dir / "config.json").is_file():
        task = read_json(run_dir / "config.json")["task"]
        row |= {"task": task["name"], "task_kind": task["kind"]}
    else:
        row["task"] = task_slug
    if (run_dir / "metrics.json").is_file():
        return row | flatten_metrics(read_json(run_dir / "metrics.json")) | {"status": "finished"}
    if (run_dir / "error.txt").is_file():
        lines = (run_dir / "error.txt").read_text(encoding="utf-8").strip().splitlines()
        return row | {"status": "failed", "error": lines[-1] if lines else "unknown error"}
    return row | {"status": "not finished"}


def flatten_metrics(metrics: dict) -> dict:
    """The CSV's columns from one run's metrics.json."""
    hooks = metrics.get("hooks") or {}
    id_hooks, ood_hooks = hooks.get(metrics["id_split"], {}), hooks.get(metrics["ood_split"], {})
    train = metrics.get("train") or {}
    directions = metrics.get("directions") or {}
    base = metrics.get("base") or {}
    return {
        "task": metrics["task"],
        "task_kind": metrics["task_kind"],
        "intended": metrics.get("intended"),
        "ablated": metrics.get("ablated"),
        "id_accuracy": metrics["id_accuracy"],
        "ood_accuracy": metrics["ood_accuracy"],
        "ood_unintended_accuracy": metrics.get("ood_unintended_accuracy"),
        "base_id_accuracy": base.get("id_accuracy"),
        "base_ood_accuracy": base.get("ood_accuracy"),
        "evaluated_with_hooks": metrics.get("evaluated_with_hooks"),
        "hooks_on_id_accuracy": id_hooks.get("hooks_on_accuracy"),
        "hooks_on_ood_accuracy": ood_hooks.get("hooks_on_accuracy"),
        "mean_kl_ood": ood_hooks.get("mean_kl_on_vs_off"),
        "answer_flip_rate_ood": ood_hooks.get("answer_flip_rate"),
        "n_directions": directions.get("n"),
        "direction_layers": " ".join(directions.get("count_by_layer", {})) or None,
        "train_steps": train.get("steps"),
        "train_seconds": train.get("seconds"),
        "final_loss": train.get("final_loss"),
        "seconds": metrics.get("seconds"),
        "n_id": metrics.get("n_id"),
        "n_ood": metrics.get("n_ood"),
    }


def results_csv(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in CSV_COLUMNS})
    return buffer.getvalue()


# ---- statistics -------------------------------------------------------------------------------
def mean_sem(values: Sequence[float]) -> dict:
    """Mean and standard error of the mean (sample std / √n; None for fewer than two values)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "sem": None, "n": 0, "values": []}
    sem = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "sem": sem, "n": len(values), "values": values}


def grid_cells(rows: Sequence[dict], min_id: float | None = None) -> dict[str, dict[str, dict]]:
    """{task: {method: {"ood": mean_sem, "id": mean_sem, "seeds": [...]}}} over finished runs.

    min_id: only runs whose ID accuracy reaches it (those that learned the training task).
    A `base` pseudo-method holds the base model's accuracy (one value per seed).
    """
    finished = [row for row in rows if row["status"] == "finished"]
    kept = finished if min_id is None else [r for r in finished if learned(r, min_id)]
    cells: dict[str, dict[str, dict]] = {}
    for task in _ordered({row["task"] for row in finished}, [r["task"] for r in rows]):
        task_rows = [row for row in finished if row["task"] == task]
        cells[task] = {"base": _base_cell(task_rows)}
        kept_rows = [row for row in kept if row["task"] == task]
        for method in _ordered({row["method"] for row in kept_rows}, list(METHODS)):
            method_rows = sorted(
                (r for r in kept_rows if r["method"] == method), key=lambda r: r["seed"]
            )
            cells[task][method] = {
                "ood": mean_sem([r["ood_accuracy"] for r in method_rows]),
                "id": mean_sem([r["id_accuracy"] for r in method_rows]),
                "seeds": [r["seed"] for r in method_rows],
            }
    return cells


def learned(row: dict, min_id: float) -> bool:
    """Whether a finished run learned the training task: its ID accuracy reaches `min_id`. A run
    that did not is near chance on every split, so its OOD accuracy says nothing about what it
    generalized; judged on ID data only, which a user has."""
    return row["id_accuracy"] is not None and row["id_accuracy"] >= min_id


def _base_cell(task_rows: Sequence[dict]) -> dict:
    by_seed = {}
    for row in task_rows:
        if row.get("base_ood_accuracy") is not None:
            by_seed[row["seed"]] = (row["base_id_accuracy"], row["base_ood_accuracy"])
    seeds = sorted(by_seed)
    return {
        "ood": mean_sem([by_seed[s][1] for s in seeds]),
        "id": mean_sem([by_seed[s][0] for s in seeds]),
        "seeds": seeds,
    }


def _ordered(items: set, order: Sequence) -> list:
    known = [item for item in dict.fromkeys(order) if item in items]
    return known + sorted(items - set(known))


def compare(cells: dict, method: str, other: str) -> dict | None:
    """Over settings that have both: how often `method`'s mean OOD accuracy beats `other`'s.

    Also the difference per setting and its mean, and per seed: wins among paired seeds.
    """
    by_setting, paired_wins, paired = {}, 0, 0
    for task, by_method in cells.items():
        a, b = by_method.get(method), by_method.get(other)
        if not a or not b or a["ood"]["mean"] is None or b["ood"]["mean"] is None:
            continue
        by_setting[task] = a["ood"]["mean"] - b["ood"]["mean"]
        b_by_seed = dict(zip(b["seeds"], b["ood"]["values"], strict=True))
        for seed, value in zip(a["seeds"], a["ood"]["values"], strict=True):
            if seed in b_by_seed:
                paired += 1
                paired_wins += value > b_by_seed[seed]
    if not by_setting:
        return None
    differences = list(by_setting.values())
    return {
        "method": method,
        "other": other,
        "n_settings": len(differences),
        "wins": sum(d > 0 for d in differences),
        "ties": sum(d == 0 for d in differences),
        "mean_difference": statistics.fmean(differences),
        "by_setting": by_setting,
        "paired_seed_wins": paired_wins,
        "paired_seeds": paired,
    }


def comparisons(cells: dict) -> list[dict]:
    methods = _ordered({m for by in cells.values() for m in by if m != "base"}, list(METHODS))
    result = []
    for method in (m for m in CAFT_METHODS if m in methods):
        for other in (m for m in methods if m != method):
            found = compare(cells, method, other)
            if found:
                result.append(found)
    return result


# ---- writing ----------------------------------------------------------------------------------
def _cell_text(cell: dict | None) -> str:
    if not cell or cell["ood"]["mean"] is None:
        return "–"
    ood = cell["ood"]
    spread = f" ± {ood['sem']:.3f}" if ood["sem"] is not None else ""
    return f"{ood['mean']:.3f}{spread} (ID {cell['id']['mean']:.3f})"


def markdown(report: dict) -> str:
    cells, settings = report["cells"], report["settings"]
    methods = report["methods"]
    n_seeds = report["n_seeds"]
    lines = [
        f"# {settings.get('name', 'experiment')}: OOD accuracy on the intended question",
        "",
        f"Model: {settings.get('model') or 'embedded SmolLM2-135M-Instruct'}; {_recipe(settings)}.",
        f"Runs: {report['counts']['finished']} finished, {report['counts']['failed']} failed, "
        f"{report['counts']['not finished']} not finished.",
        "",
        f"Each cell: OOD accuracy on the intended question, mean ± s.e.m. over seeds (up to "
        f"{n_seeds}), and the ID accuracy beside it. ID: held-out items like the training data "
        "(double MC: the ambiguous validation split); OOD: items where the two cues disagree "
        "(double MC: the unambiguous test split; gender: stereotype inverted). Fine-tuned models "
        "are evaluated without hooks except `test-time ablation`; `base` is the model before "
        "fine-tuning.",
        "",
    ]
    lines += _table_lines(cells, methods)
    lines += _comparison_lines(report["comparisons"])
    lines += _learned_lines(report["learned"], methods)
    lines += _hook_lines(report["hook_dependence"])
    lines += _failure_lines(report["failures"])
    lines += [
        "",
        "![OOD accuracy by setting and method](ood_accuracy.png)",
        "",
        "![ID vs OOD accuracy of every run](id_vs_ood.png)",
        "",
        "Every run's numbers: `results.csv`; its files: `runs/<setting>/<method>/seed_<s>/`.",
        "",
    ]
    return "\n".join(lines)


def _table_lines(cells: dict, methods: Sequence[str]) -> list[str]:
    lines = [
        "| setting | " + " | ".join(["base", *[_label(m) for m in methods]]) + " |",
        "|---|" + "---|" * (len(methods) + 1),
    ]
    for task, by_method in cells.items():
        texts = [_cell_text(by_method.get(m)) for m in ["base", *methods]]
        lines.append(f"| {_escape(task)} | " + " | ".join(texts) + " |")
    return lines


def _learned_lines(learned_part: dict, methods: Sequence[str]) -> list[str]:
    """The table and comparisons again over the runs that learned the training task."""
    not_learned = learned_part["not_learned"]
    if not not_learned:
        return []
    min_id = learned_part["min_id_accuracy"]
    listed = ", ".join(
        f"{r['run_id']} (ID {r['id_accuracy']:.2f}, OOD {r['ood_accuracy']:.2f})"
        for r in not_learned
    )
    lines = [
        "",
        f"## Runs that learned the training task (ID ≥ {min_id:g})",
        "",
        f"{len(not_learned)} finished run(s) stayed below ID accuracy {min_id:g}: near chance on "
        "both splits, their OOD accuracy says nothing about which question they learned to "
        f"answer. Left out here (judged on ID data only): {listed}.",
        "",
        *_table_lines(learned_part["cells"], methods),
    ]
    return lines + _comparison_lines(
        learned_part["comparisons"], title="CAFT vs the others, runs that learned the task only"
    )


def _escape(text: str) -> str:
    """Setting names hold '|', which would end a markdown table cell."""
    return text.replace("|", "\\|")


def _recipe(settings: dict) -> str:
    steps = (
        f"{settings['epochs']:g} epochs"
        if settings.get("epochs")
        else f"{settings.get('steps')} steps"
    )
    return (
        f"{steps}, batch {settings.get('batch_size')}, learning rate "
        f"{settings.get('learning_rate')}, PCA {settings.get('n_components')} PCs per layer"
    )


def _comparison_lines(
    found: list[dict], title: str = "Does CAFT beat the plain fine-tune and the controls?"
) -> list[str]:
    if not found:
        return []
    lines = [
        "",
        f"## {title}",
        "",
        "Settings where CAFT's mean OOD accuracy is higher (equal ones counted as tied), and the "
        "mean difference over those settings (accuracy points); per seed: wins among runs with the "
        "same seed (same data).",
        "",
        "| CAFT | vs | settings won | mean difference | seeds won |",
        "|---|---|---|---|---|",
    ]
    for c in found:
        tied = f" ({c['ties']} tied)" if c["ties"] else ""
        lines.append(
            f"| {_label(c['method'])} | {_label(c['other'])} | {c['wins']} of {c['n_settings']}"
            f"{tied} | {100 * c['mean_difference']:+.1f} | "
            f"{c['paired_seed_wins']} of {c['paired_seeds']} |"
        )
    return lines + _difference_table(found)


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _difference_table(found: list[dict]) -> list[str]:
    """Settings × comparisons: mean OOD accuracy of the CAFT method minus the other's, in points."""
    tasks = list(dict.fromkeys(task for c in found for task in c["by_setting"]))
    header = [f"{_label(c['method'])} − {_label(c['other'])}" for c in found]
    lines = [
        "",
        "Per setting (mean OOD accuracy, points):",
        "",
        "| setting | " + " | ".join(header) + " |",
        "|---|" + "---|" * len(found),
    ]
    for task in tasks:
        values = [c["by_setting"].get(task) for c in found]
        texts = ["–" if v is None else f"{100 * v:+.1f}" for v in values]
        lines.append(f"| {_escape(task)} | " + " | ".join(texts) + " |")
    return lines


def hook_dependence(rows: Sequence[dict]) -> dict[str, dict]:
    """Per method: mean KL(hooks on ‖ off) and answer flip rate on OOD items, over runs."""
    result = {}
    for method in _ordered({r["method"] for r in rows}, list(METHODS)):
        values = [
            r
            for r in rows
            if r["method"] == method and r["status"] == "finished" and r["mean_kl_ood"] is not None
        ]
        if values:
            result[method] = {
                "mean_kl_ood": mean_sem([r["mean_kl_ood"] for r in values]),
                "answer_flip_rate_ood": mean_sem([r["answer_flip_rate_ood"] for r in values]),
                "hooks_on_ood_accuracy": mean_sem([r["hooks_on_ood_accuracy"] for r in values]),
            }
    return result


def _hook_lines(dependence: dict) -> list[str]:
    if not dependence:
        return []
    lines = [
        "",
        "## Do the models depend on the hooks?",
        "",
        "Over all runs of a method, OOD items: KL(hooks on ‖ hooks off) of the answer "
        "distribution, the share of answers that flip, and the accuracy with hooks on. Near zero: "
        "the model learned without relying on the ablation.",
        "",
        "| method | mean KL | flip rate | OOD accuracy, hooks on |",
        "|---|---|---|---|",
    ]
    for method, stats in dependence.items():
        lines.append(
            f"| {METHOD_LABELS.get(method, method)} | {_short(stats['mean_kl_ood'])} | "
            f"{_short(stats['answer_flip_rate_ood'])} | {_short(stats['hooks_on_ood_accuracy'])} |"
        )
    return lines


def _short(stat: dict) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{stat['mean']:.3f}" + (f" ± {stat['sem']:.3f}" if stat["sem"] is not None else "")


def _failure_lines(failures: list[dict]) -> list[str]:
    if not failures:
        return []
    lines = ["", "## Failed runs", "", "| run | error |", "|---|---|"]
    lines += [f"| {f['run_id']} | {f['error']} |" for f in failures]
    lines += ["", "Re-running the experiment retries them (`error.txt` in each run folder)."]
    return lines


def build_report(root: str | Path) -> tuple[dict, list[dict]]:
    """(report, rows) of the experiment in `root`."""
    root = Path(root)
    rows = collect_results(root)
    settings = read_json(root / "experiment.json") if (root / "experiment.json").is_file() else {}
    settings.pop("run_ids", None)
    cells = grid_cells(rows)
    min_id = settings.get("min_id_accuracy", DEFAULT_MIN_ID_ACCURACY)
    not_learned = [
        {"run_id": r["run_id"], "id_accuracy": r["id_accuracy"], "ood_accuracy": r["ood_accuracy"]}
        for r in rows
        if r["status"] == "finished" and not learned(r, min_id)
    ]
    learned_cells = grid_cells(rows, min_id) if not_learned else cells
    methods = _ordered({m for by in cells.values() for m in by if m != "base"}, list(METHODS))
    counts = {
        s: sum(r["status"] == s for r in rows) for s in ("finished", "failed", "not finished")
    }
    report = {
        "settings": settings,
        "methods": methods,
        "n_seeds": len({r["seed"] for r in rows}),
        "counts": counts,
        "cells": cells,
        "comparisons": comparisons(cells),
        "learned": {
            "min_id_accuracy": min_id,
            "not_learned": not_learned,
            "cells": learned_cells,
            "comparisons": comparisons(learned_cells),
        },
        "hook_dependence": hook_dependence(rows),
        "failures": [
            {"run_id": r["run_id"], "error": r["error"]} for r in rows if r["status"] == "failed"
        ],
    }
    return report, rows


def write_grid_report(root: str | Path, *, figures: bool = True) -> dict:
    """Write results.csv, report.md, report.json and the figures into `root`; return the report."""
    root = Path(root)
    report, rows = build_report(root)
    atomic_write_text(root / "results.csv", results_csv(rows))
    write_json(root / "report.json", report)
    atomic_write_text(root / "report.md", markdown(report))
    if figures and report["cells"]:
        plot_bars(report, root / "ood_accuracy.png")
        plot_scatter(rows, root / "id_vs_ood.png")
    return report


# ---- figures ----------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    tmp.replace(path)


def _colors(methods: Sequence[str]) -> dict[str, object]:
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    return {m: palette(list(METHODS).index(m) % 10 if m in METHODS else 9) for m in methods}


def plot_bars(report: dict, path: Path) -> None:
    """Grouped bars: OOD accuracy per setting (groups) and method (bars); s.e.m. and seed dots."""
    plt = _pyplot()
    cells, methods = report["cells"], report["methods"]
    tasks = list(cells)
    colors = _colors(methods)
    width = 0.8 / max(1, len(methods))
    figure, axis = plt.subplots(
        figsize=(max(7.0, 1.1 * len(tasks) * max(1, len(methods)) / 3), 4.5)
    )
    for j, method in enumerate(methods):
        positions, means, errors = [], [], []
        for i, task in enumerate(tasks):
            cell = cells[task].get(method)
            if not cell or cell["ood"]["mean"] is None:
                continue
            x = i - 0.4 + width * (j + 0.5)
            positions.append(x)
            means.append(cell["ood"]["mean"])
            errors.append(cell["ood"]["sem"] or 0.0)
            axis.scatter(
                [x] * cell["ood"]["n"], cell["ood"]["values"], s=6, color="black", zorder=3
            )
        axis.bar(
            positions, means, width, yerr=errors, capsize=2, color=colors[method],
            label=METHOD_LABELS.get(method, method),
        )  # fmt: skip
    axis.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    axis.set_xticks(range(len(tasks)))
    axis.set_xticklabels(tasks, rotation=30 if len(tasks) > 4 else 0, ha="right", fontsize=8)
    axis.set_ylim(0, 1.15)
    axis.set_ylabel("OOD accuracy (intended question)")
    axis.set_title(f"{report['settings'].get('name', 'experiment')}: mean ± s.e.m.; dots = seeds")
    axis.legend(loc="upper center", ncol=min(4, len(methods)), frameon=False, fontsize=8)
    figure.tight_layout()
    _save(figure, path)


MARKERS = "osD^vP*X"


def plot_scatter(rows: Sequence[dict], path: Path) -> None:
    """ID vs OOD accuracy: every finished run (small, faint) and each setting's mean per method."""
    plt = _pyplot()
    finished = [r for r in rows if r["status"] == "finished"]
    methods = _ordered({r["method"] for r in finished}, list(METHODS))
    colors = _colors(methods)
    cells = grid_cells(finished)
    figure, axis = plt.subplots(figsize=(5.8, 5.2))
    for index, method in enumerate(methods):
        points = [r for r in finished if r["method"] == method]
        axis.scatter(
            [r["id_accuracy"] for r in points], [r["ood_accuracy"] for r in points],
            s=8, alpha=0.35, color=colors[method],
        )  # fmt: skip
        means = [by[method] for by in cells.values() if method in by]
        axis.scatter(
            [c["id"]["mean"] for c in means], [c["ood"]["mean"] for c in means],
            s=46, marker=MARKERS[index % len(MARKERS)], color=colors[method],
            edgecolors="black", linewidths=0.5, label=METHOD_LABELS.get(method, method),
        )  # fmt: skip
    axis.plot([0, 1], [0, 1], color="grey", linewidth=0.6, linestyle=":")
    axis.set_xlim(-0.02, 1.02)
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel("ID accuracy")
    axis.set_ylabel("OOD accuracy (intended question)")
    axis.set_title("ID vs OOD: setting means (large) and runs (small)", fontsize=10)
    axis.legend(fontsize=8, frameon=False, loc="lower left")
    figure.tight_layout()
    _save(figure, path)
