"""The grid report on small synthetic results: CSV shape, the table's mean ± s.e.m. (checked against
numbers computed by hand), the win counts, failures and missing runs, and the figures."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from caft.experiments.grid_report import (
    CSV_COLUMNS,
    _comparison_lines,
    build_report,
    compare,
    markdown,
    mean_sem,
    write_grid_report,
)

SLUGS = {
    "verbs|SENTIMENT": "verbs-sentiment.intended-sentiment",
    "sentiment|VERBS": "sentiment-verbs.intended-verbs",
}
# (setting, method) -> OOD accuracy per seed 0, 1, 2 (None: that run failed)
OOD = {
    ("verbs|SENTIMENT", "none"): [0.2, 0.4, 0.3],
    ("verbs|SENTIMENT", "caft_pca"): [0.8, 0.9, 0.7],
    ("verbs|SENTIMENT", "random"): [0.25, 0.35, 0.3],
    ("sentiment|VERBS", "none"): [0.6, 0.5, 0.7],
    ("sentiment|VERBS", "caft_pca"): [0.5, 0.55, 0.6],
    ("sentiment|VERBS", "random"): [0.4, 0.46, None],
}
MISSING = "verbs-sentiment.intended-sentiment/top_k/seed_0"


def _metrics(setting: str, method: str, seed: int, ood: float) -> dict:
    hooks = None
    if method != "none":
        hooks = {
            "val": {"hooks_off_accuracy": 0.95, "hooks_on_accuracy": 0.9},
            "test": {
                "hooks_off_accuracy": ood,
                "hooks_on_accuracy": ood - 0.1,
                "mean_kl_on_vs_off": 0.02 * (seed + 1),
                "answer_flip_rate": 0.1,
            },
        }
    return {
        "format": "caft.run_metrics",
        "run_id": f"{SLUGS[setting]}/{method}/seed_{seed}",
        "task": setting,
        "task_kind": "double_mc",
        "intended": "x",
        "ablated": "y",
        "method": method,
        "seed": seed,
        "id_split": "val",
        "ood_split": "test",
        "id_accuracy": 0.95,
        "ood_accuracy": ood,
        "ood_unintended_accuracy": round(1 - ood, 4),
        "n_id": 100,
        "n_ood": 100,
        "evaluated_with_hooks": False,
        "hooks": hooks,
        "train": {"steps": 50, "seconds": 12.5, "final_loss": 0.1},
        "directions": None if method == "none" else {"n": 3, "count_by_layer": {"0": 2, "4": 1}},
        "base": {"id_accuracy": 0.5, "ood_accuracy": 0.45 + 0.01 * seed},
        "seconds": 20.0,
    }


@pytest.fixture
def experiment(tmp_path) -> Path:
    run_ids = []
    for (setting, method), values in OOD.items():
        for seed, ood in enumerate(values):
            run_id = f"{SLUGS[setting]}/{method}/seed_{seed}"
            run_ids.append(run_id)
            folder = tmp_path / "runs" / run_id
            folder.mkdir(parents=True)
            task = {"kind": "double_mc", "name": setting}
            (folder / "config.json").write_text(json.dumps({"task": task}))
            if ood is None:
                (folder / "error.txt").write_text("Traceback ...\nRuntimeError: out of memory\n")
            else:
                (folder / "metrics.json").write_text(
                    json.dumps(_metrics(setting, method, seed, ood))
                )
    settings = {"name": "synthetic grid", "model": None, "steps": 50, "batch_size": 16}
    settings |= {"learning_rate": 2e-5, "n_components": 10, "epochs": 0}
    (tmp_path / "experiment.json").write_text(
        json.dumps(settings | {"run_ids": [*run_ids, MISSING]})
    )
    return tmp_path


def sem(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def test_mean_and_sem_match_a_hand_computation():
    stats = mean_sem([0.2, 0.4, 0.3])
    assert stats["mean"] == pytest.approx(0.3)
    assert stats["sem"] == pytest.approx(0.1 / math.sqrt(3))
    assert mean_sem([0.7])["sem"] is None
    assert mean_sem([])["mean"] is None


def test_csv_has_one_row_per_planned_run_and_every_column(experiment):
    write_grid_report(experiment)
    with (experiment / "results.csv").open() as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames) == CSV_COLUMNS
    assert len(rows) == 18 + 1
    status = {row["run_id"]: row["status"] for row in rows}
    assert status["sentiment-verbs.intended-verbs/random/seed_2"] == "failed"
    assert status[MISSING] == "not finished"
    assert sum(s == "finished" for s in status.values()) == 17
    row = next(
        r for r in rows if r["run_id"] == "verbs-sentiment.intended-sentiment/caft_pca/seed_1"
    )
    assert row["task"] == "verbs|SENTIMENT" and float(row["ood_accuracy"]) == 0.9
    assert float(row["hooks_on_ood_accuracy"]) == pytest.approx(0.8)
    assert row["direction_layers"] == "0 4" and row["n_directions"] == "3"


def test_markdown_table_shows_mean_sem_and_id_per_setting_and_method(experiment):
    write_grid_report(experiment)
    text = (experiment / "report.md").read_text()
    header = "| setting | base | plain | CAFT-PCA | random |"
    assert header in text
    line_a = next(line for line in text.splitlines() if line.startswith("| verbs\\|SENTIMENT |"))
    cells = [cell.strip() for cell in line_a.strip("|").split(" | ")]
    assert cells[1] == f"0.460 ± {sem([0.45, 0.46, 0.47]):.3f} (ID 0.500)"
    assert cells[2] == f"0.300 ± {sem([0.2, 0.4, 0.3]):.3f} (ID 0.950)"
    assert cells[3] == f"0.800 ± {sem([0.8, 0.9, 0.7]):.3f} (ID 0.950)"
    line_b = next(line for line in text.splitlines() if line.startswith("| sentiment\\|VERBS |"))
    assert f"0.550 ± {sem([0.5, 0.55, 0.6]):.3f} (ID 0.950)" in line_b
    assert f"0.430 ± {sem([0.4, 0.46]):.3f} (ID 0.950)" in line_b  # the failed seed is left out
    assert "17 finished, 1 failed, 1 not finished" in text
    assert "RuntimeError: out of memory" in text


def test_win_counts_and_mean_differences(experiment):
    report, _ = build_report(experiment)
    by_other = {c["other"]: c for c in report["comparisons"]}
    plain, control = by_other["none"], by_other["random"]
    assert (plain["wins"], plain["n_settings"]) == (1, 2)
    assert plain["mean_difference"] == pytest.approx(((0.8 - 0.3) + (0.55 - 0.6)) / 2)
    assert (plain["paired_seed_wins"], plain["paired_seeds"]) == (4, 6)
    assert (control["wins"], control["n_settings"]) == (2, 2)
    assert control["mean_difference"] == pytest.approx(((0.8 - 0.3) + (0.55 - 0.43)) / 2)
    assert (control["paired_seed_wins"], control["paired_seeds"]) == (5, 5)
    text = (write_grid_report(experiment), (experiment / "report.md").read_text())[1]
    assert "| CAFT-PCA | plain | 1 of 2 | +22.5 | 4 of 6 |" in text
    assert "| CAFT-PCA | random | 2 of 2 | +31.0 | 5 of 5 |" in text
    assert plain["by_setting"]["verbs|SENTIMENT"] == pytest.approx(0.8 - 0.3)
    assert "| CAFT-PCA − plain | CAFT-PCA − random |" in text
    assert "| sentiment\\|VERBS | -5.0 | +12.0 |" in text


def test_equal_means_count_as_ties_not_wins():
    def cell(values):
        return {"seeds": [0, 1], "ood": {"mean": sum(values) / 2, "values": values}}

    cells = {"a": {"caft_pca": cell([1.0, 1.0]), "none": cell([1.0, 1.0])}}
    found = compare(cells, "caft_pca", "none")
    assert (found["wins"], found["ties"], found["paired_seed_wins"]) == (0, 1, 0)
    assert "| CAFT-PCA | plain | 0 of 1 (1 tied) | +0.0 | 0 of 2 |" in "\n".join(
        _comparison_lines([found])
    )


def test_hook_dependence_is_averaged_over_runs(experiment):
    report, _ = build_report(experiment)
    caft = report["hook_dependence"]["caft_pca"]
    assert caft["mean_kl_ood"]["mean"] == pytest.approx((0.02 + 0.04 + 0.06) * 2 / 6)
    assert "none" not in report["hook_dependence"]


def test_figures_are_written_as_png(experiment):
    write_grid_report(experiment)
    for name in ("ood_accuracy.png", "id_vs_ood.png"):
        data = (experiment / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list(experiment.glob(".*.tmp.png"))


def test_an_empty_experiment_gives_a_report_without_figures(tmp_path):
    report = write_grid_report(tmp_path)
    assert report["cells"] == {}
    assert (tmp_path / "report.md").is_file() and (tmp_path / "results.csv").is_file()
    assert not (tmp_path / "ood_accuracy.png").exists()


def test_runs_that_did_not_learn_the_task_are_listed_and_compared_without(experiment):
    report, _ = build_report(experiment)
    assert report["learned"]["not_learned"] == [] and "learned the training task" not in markdown(
        report
    )
    path = experiment / "runs" / "verbs-sentiment.intended-sentiment/caft_pca/seed_2/metrics.json"
    metrics = json.loads(path.read_text())
    path.write_text(json.dumps(metrics | {"id_accuracy": 0.5}))
    report, _ = build_report(experiment)
    part = report["learned"]
    assert part["min_id_accuracy"] == 0.9
    assert [r["run_id"] for r in part["not_learned"]] == [metrics["run_id"]]
    cell = part["cells"]["verbs|SENTIMENT"]["caft_pca"]
    assert cell["seeds"] == [0, 1] and cell["ood"]["mean"] == pytest.approx(0.85)
    assert report["cells"]["verbs|SENTIMENT"]["caft_pca"]["seeds"] == [0, 1, 2]
    plain = next(c for c in part["comparisons"] if c["other"] == "none")
    assert plain["mean_difference"] == pytest.approx(((0.85 - 0.3) + (0.55 - 0.6)) / 2)
    assert plain["paired_seeds"] == 5
    text = markdown(report)
    assert "## Runs that learned the training task (ID ≥ 0.9)" in text
    assert f"{metrics['run_id']} (ID 0.50, OOD 0.70)" in text
    assert "| CAFT-PCA | plain | 1 of 2 | +25.0 | 3 of 5 |" in text


def test_unplanned_folders_count_only_when_they_hold_a_result(experiment):
    planned_rows = len(build_report(experiment)[1])
    dropped = experiment / "runs" / "sports-verbs.intended-verbs"
    (dropped / "none" / "seed_0").mkdir(parents=True)
    (dropped / "none" / "seed_0" / "config.json").write_text(json.dumps({"task": {}}))
    assert len(build_report(experiment)[1]) == planned_rows  # planned once, never run
    (dropped / "caft_pca" / "seed_0").mkdir(parents=True)
    (dropped / "caft_pca" / "seed_0" / "error.txt").write_text("RuntimeError: boom\n")
    rows = build_report(experiment)[1]
    assert len(rows) == planned_rows + 1 and rows[-1]["status"] == "failed"
