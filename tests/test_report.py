"""The demo report: summary statistics across seeds, the per-seed verdict, the markdown tables and
the PNG plot, on synthetic seed results shaped like `caft.experiments.demo.run_seed`'s."""

from __future__ import annotations

import json
import statistics

import pytest

from caft.experiments.report import CONDITIONS, markdown, summarize, write_demo_report


def _mc(accuracy: float) -> dict:
    return {"accuracy": accuracy, "n": 24, "accuracy_by_category": {"nominative": accuracy}}


def _hooks(off: float, on: float, kl: float, flips: float) -> dict:
    return {
        "hooks_off": _mc(off),
        "hooks_on": _mc(on),
        "mean_kl_on_vs_off": kl,
        "answer_flip_rate": flips,
    }


def _seed(seed: int, plain_ood: float, caft_ood: float, control_ood: float) -> dict:
    return {
        "seed": seed,
        "prefix_tokens": 13,
        "data": "synthetic",
        "selected": [f"L{seed}.0", "L5.1"],
        "base": {"id": _mc(0.6), "ood": _mc(0.4)},
        "plain": {"id": _mc(0.95), "ood": _mc(plain_ood)},
        "plain_test_time_ablation": {
            "id": _hooks(0.95, 0.9, 0.2, 0.1),
            "ood": _hooks(plain_ood, 0.3, 0.3, 0.2),
        },
        "caft": {
            "id": _hooks(0.9, 0.88, 0.01 * (seed + 1), 0.0),
            "ood": _hooks(caft_ood, 0.5, 0.02 * (seed + 1), 0.05),
        },
        "control": {
            "id": _hooks(0.93, 0.92, 0.001, 0.0),
            "ood": _hooks(control_ood, 0.2, 0.003, 0.0),
        },
    }


SEEDS = [_seed(0, 0.1, 0.7, 0.15), _seed(1, 0.2, 0.15, 0.1), _seed(2, 0.3, 0.6, 0.6)]


def test_summary_means_and_spreads_over_seeds():
    summary = summarize(SEEDS)
    caft_ood = summary["conditions"]["CAFT (hooks off, deployed)"]["ood"]
    assert caft_ood["values"] == [0.7, 0.15, 0.6]
    assert caft_ood["mean"] == pytest.approx(statistics.fmean([0.7, 0.15, 0.6]), abs=1e-4)
    assert caft_ood["std"] == pytest.approx(statistics.stdev([0.7, 0.15, 0.6]), abs=1e-4)
    assert caft_ood["n"] == 3
    tta = summary["conditions"]["plain + test-time ablation"]["ood"]
    assert tta["values"] == [0.3, 0.3, 0.3] and tta["std"] == 0.0
    assert set(summary["conditions"]) == {label for label, _ in CONDITIONS}
    kl = summary["hook_dependence"]["caft"]["ood"]["mean_kl_on_vs_off"]
    assert kl["values"] == [0.02, 0.04, 0.06] and kl["mean"] == pytest.approx(0.04)


def test_caft_beats_plain_and_control_is_strict_per_seed():
    rows = summarize(SEEDS)["per_seed"]
    assert [row["caft_beats_plain_and_control"] for row in rows] == [True, False, False]
    assert rows[0]["ood"] == {"plain": 0.1, "caft": 0.7, "control": 0.15}
    assert rows[0]["selected"] == ["L0.0", "L5.1"] and rows[0]["id_caft"] == 0.9


def test_missing_condition_is_shown_as_a_dash():
    partial = [{k: v for k, v in SEEDS[0].items() if k != "plain_test_time_ablation"}]
    summary = summarize(partial)
    assert summary["conditions"]["plain + test-time ablation"]["id"]["mean"] is None
    assert "| plain + test-time ablation | – | – |" in markdown(summary)


def test_markdown_has_the_table_rows():
    text = markdown(summarize(SEEDS))
    assert "| plain fine-tune | 0.950 ± 0.000 | 0.200 ± 0.100 |" in text
    assert "| CAFT (hooks off, deployed) | 0.900 ± 0.000 | 0.483 ± 0.293 |" in text
    assert "| CAFT | OOD | 0.040 ± 0.020 | 0.050 ± 0.000 |" in text
    assert "| 0 | 0.100 | 0.700 | 0.150 | yes | L0.0, L5.1 |" in text
    assert "| 2 | 0.300 | 0.600 | 0.600 | no | L2.0, L5.1 |" in text
    assert "over 3 seed(s)" in text


def test_single_seed_shows_no_spread():
    text = markdown(summarize(SEEDS[:1]))
    assert "| base model | 0.600 | 0.400 |" in text
    assert "±" not in text.split("## Does")[0].split("|---|---|---|")[1]


def test_write_demo_report_writes_json_markdown_and_png(tmp_path):
    summary = write_demo_report(tmp_path / "run", config={"steps": 3}, seed_results=SEEDS)
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["config"] == {"steps": 3} and saved["seed_results"] == SEEDS
    assert saved["per_seed"] == summary["per_seed"]
    assert (tmp_path / "run" / "report.md").read_text() == markdown(summary)
    png = tmp_path / "run" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[0] > 200 and image.shape[1] > 400
    assert not list((tmp_path / "run").glob(".*"))  # no temporary files left behind
