"""The demo's report: a JSON summary, a markdown table and a bar plot (ID and OOD per condition)."""

from __future__ import annotations

import statistics
from pathlib import Path

from caft.io import atomic_write_text, write_json

SPLITS = ("id", "ood")
# (label, path into one seed's results, key under the split)
CONDITIONS = (
    ("base model", ("base",)),
    ("plain fine-tune", ("plain",)),
    ("plain + test-time ablation", ("plain_test_time_ablation", "hooks_on")),
    ("CAFT (hooks off, deployed)", ("caft", "hooks_off")),
    ("CAFT (hooks on)", ("caft", "hooks_on")),
    ("random control (hooks off)", ("control", "hooks_off")),
    ("random control (hooks on)", ("control", "hooks_on")),
)
PLOTTED = (
    "base model",
    "plain fine-tune",
    "CAFT (hooks off, deployed)",
    "random control (hooks off)",
)


def accuracy(seed_result: dict, path: tuple[str, ...], split: str) -> float | None:
    node = seed_result.get(path[0])
    if node is None or split not in node:
        return None
    node = node[split]
    for key in path[1:]:
        node = node.get(key, {})
    return node.get("accuracy")


def mean_spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(std, 4),
        "n": len(values),
        "values": values,
    }


def summarize(seed_results: list[dict]) -> dict:
    conditions = {}
    for label, path in CONDITIONS:
        conditions[label] = {
            split: mean_spread([accuracy(r, path, split) for r in seed_results]) for split in SPLITS
        }
    dependence = {}
    for name in ("caft", "control"):
        dependence[name] = {
            split: {
                metric: mean_spread([r[name][split][metric] for r in seed_results if name in r])
                for metric in ("mean_kl_on_vs_off", "answer_flip_rate")
            }
            for split in SPLITS
        }
    per_seed = []
    for r in seed_results:
        ood = {name: accuracy(r, path, "ood") for name, path in (
            ("plain", ("plain",)), ("caft", ("caft", "hooks_off")), ("control", ("control", "hooks_off"))
        )}  # fmt: skip
        per_seed.append(
            {
                "seed": r["seed"],
                "selected": r.get("selected", []),
                "ood": ood,
                "id_caft": accuracy(r, ("caft", "hooks_off"), "id"),
                "caft_beats_plain_and_control": ood["control"] is not None
                and ood["caft"] > max(ood["plain"], ood["control"]),
            }
        )
    return {"conditions": conditions, "hook_dependence": dependence, "per_seed": per_seed}


def write_demo_report(
    output_dir: str | Path,
    *,
    config: dict,
    seed_results: list[dict],
    variants: dict[str, list[dict]] | None = None,
) -> dict:
    """Report the run's variant (`seed_results`) in full and, when the same seeds hold other
    variants (`variants`: {name: seed results}, e.g. PCA vs SAE, or selection routes), a
    side-by-side table of them all."""
    output_dir = Path(output_dir)
    summary = {"config": config, **summarize(seed_results), "seed_results": seed_results}
    if variants and len(variants) > 1:
        summary["variants"] = {
            name: summarize(results)["conditions"] for name, results in variants.items()
        }
        summary["variants_per_seed"] = {
            name: {
                r["seed"]: {
                    "selected": r.get("selected", []),
                    "ood_caft": accuracy(r, ("caft", "hooks_off"), "ood"),
                    "ood_control": accuracy(r, ("control", "hooks_off"), "ood"),
                }
                for r in results
            }
            for name, results in variants.items()
        }
    write_json(output_dir / "report.json", summary)
    atomic_write_text(output_dir / "report.md", markdown(summary))
    plot(summary, output_dir / "report.png")
    return summary


def _fmt(stat: dict) -> str:
    if stat["mean"] is None:
        return "–"
    if stat["n"] > 1:
        return f"{stat['mean']:.3f} ± {stat['std']:.3f}"
    return f"{stat['mean']:.3f}"


def markdown(summary: dict) -> str:
    n_seeds = len(summary["per_seed"])
    config = summary.get("config", {})
    variant = f"{config.get('method', 'pca')}-{config.get('selection', 'contrast')}"
    lines = [
        "# CAFT demo: gender-pronoun task",
        "",
        f"Variant `{variant}` (candidates from {variant.split('-')[0].upper()}, "
        f"{variant.split('-')[1]} selection); other variants on the same seeds are compared at "
        "the end."
        if "variants" in summary
        else f"Variant `{variant}`.",
        "",
        f"Accuracy on held-out templates; mean ± standard deviation over {n_seeds} seed(s). "
        "ID: the profession stereotype agrees with the correct pronoun (as in training); "
        "OOD: it is inverted. Deployed models are evaluated with the hooks removed.",
        "",
        "| condition | ID accuracy | OOD accuracy |",
        "|---|---|---|",
    ]
    for label, stats in summary["conditions"].items():
        lines.append(f"| {label} | {_fmt(stats['id'])} | {_fmt(stats['ood'])} |")
    lines += [
        "",
        "## Does the model depend on the hooks?",
        "",
        "Change of the trained model's answer distribution when the ablation hooks are switched on "
        "(KL(on ‖ off) of the next-token distribution at the answer; fraction of answers flipped). "
        "Near zero means the model learned without relying on the ablation: what it does with the "
        "hooks removed is what it learned. Large values mean it came to depend on them.",
        "",
        "| model | split | mean KL | answer flip rate |",
        "|---|---|---|---|",
    ]
    for name, label in (("caft", "CAFT"), ("control", "random control")):
        for split in SPLITS:
            stats = summary["hook_dependence"][name][split]
            lines.append(
                f"| {label} | {split.upper()} | {_fmt(stats['mean_kl_on_vs_off'])} | "
                f"{_fmt(stats['answer_flip_rate'])} |"
            )
    lines += ["", "## Per seed (OOD accuracy, hooks off)", ""]
    lines += ["| seed | plain | CAFT | control | CAFT beats both | selected directions |"]
    lines += ["|---|---|---|---|---|---|"]
    for row in summary["per_seed"]:
        ood = row["ood"]
        lines.append(
            f"| {row['seed']} | {_num(ood['plain'])} | {_num(ood['caft'])} | "
            f"{_num(ood['control'])} | {'yes' if row['caft_beats_plain_and_control'] else 'no'} | "
            f"{', '.join(row['selected'])} |"
        )
    lines += ["", "![ID and OOD accuracy](report.png)", ""]
    if "variants" in summary:
        lines += variants_markdown(summary)
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def variants_markdown(summary: dict) -> list[str]:
    """Every method / selection route run on these seeds, side by side (hooks off)."""
    lines = [
        "## Methods and selection routes side by side",
        "",
        "Each variant (`method-selection`) fine-tuned from the same base with the same data, steps "
        "and seeds as the plain fine-tune above; only the ablated directions differ. Hooks off.",
        "",
        "| variant | CAFT ID | CAFT OOD | control OOD | OOD per seed (CAFT) | selected per seed |",
        "|---|---|---|---|---|---|",
    ]
    for name, conditions in summary["variants"].items():
        per_seed = summary["variants_per_seed"][name]
        caft = conditions["CAFT (hooks off, deployed)"]
        control = conditions["random control (hooks off)"]
        seeds = sorted(per_seed)
        lines.append(
            f"| {name} | {_fmt(caft['id'])} | {_fmt(caft['ood'])} | {_fmt(control['ood'])} | "
            + " / ".join(_num(per_seed[s]["ood_caft"]) for s in seeds)
            + " | "
            + "; ".join(",".join(per_seed[s]["selected"]) or "–" for s in seeds)
            + " |"
        )
    return [*lines, ""]


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.2))
    width = 0.38
    for offset, split, color in ((-width / 2, "id", "#7a9cc6"), (width / 2, "ood", "#d9822b")):
        means, errors = [], []
        for index, label in enumerate(PLOTTED):
            stats = summary["conditions"][label][split]
            means.append(stats["mean"] or 0.0)
            errors.append(stats["std"] or 0.0)
            axis.scatter(
                [index + offset] * len(stats["values"]),
                stats["values"],
                color="black",
                s=8,
                zorder=3,
            )
        positions = [i + offset for i in range(len(PLOTTED))]
        axis.bar(positions, means, width, yerr=errors, capsize=3, color=color, label=split.upper())
    axis.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    axis.set_xticks(range(len(PLOTTED)))
    axis.set_xticklabels([label.replace(" (", "\n(") for label in PLOTTED], fontsize=8)
    axis.set_ylim(0, 1.18)
    axis.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axis.set_ylabel("accuracy")
    axis.set_title(f"Gender-pronoun task, {len(summary['per_seed'])} seed(s); dots = seeds")
    axis.legend(loc="upper center", ncol=2, frameon=False)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    tmp.replace(path)
