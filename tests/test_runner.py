"""The experiment runner: every method end to end on a tiny model, resume (finished runs skipped,
broken and failed ones redone), one crash not losing the others, shared steps computed once (also
by parallel workers), and a kill of `caft experiment` mid-grid followed by a clean completion."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from caft.cli import main
from caft.concepts import ConceptSet
from caft.errors import CaftError
from caft.experiments import methods as methods_module
from caft.experiments.runner import (
    ExperimentConfig,
    RunSpec,
    TaskSpec,
    ensure_shared_step,
    execute_run,
    file_lock,
    load_experiment_config,
    parse_tasks,
    plan_runs,
    prepare_experiment,
    run_experiment,
    run_status,
    select_runs,
)
from conftest import tiny_llama

REPO = Path(__file__).resolve().parents[1]
ALL_METHODS = [
    "none",
    "caft_pca",
    "random",
    "top_k",
    "random_orthonormal",
    "test_time_only",
    "fewer_steps",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama and the test tokenizer, saved as a model folder the runner can load."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_config(model_dir: Path, output_dir: Path, **overrides) -> ExperimentConfig:
    settings = dict(
        name="tiny grid",
        output_dir=str(output_dir),
        model=str(model_dir),
        device="cpu",
        tasks=["verbs|SENTIMENT"],
        methods=["none", "caft_pca", "random"],
        seeds=[0],
        steps=2,
        batch_size=4,
        learning_rate=1e-3,
        n_eval=8,
        n_max=60,
        pca_sequences=8,
        n_components=2,
        contrast_texts=10,
        n_random_null=20,
        threads=1,
    )
    return ExperimentConfig(**(settings | overrides))


def metrics_of(root: Path, run_id: str) -> dict:
    return json.loads((root / "runs" / run_id / "metrics.json").read_text())


def mtimes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.glob("runs/**/metrics.json")
    }


def test_every_method_runs_and_a_rerun_skips_finished_runs(model_dir, tmp_path, monkeypatch):
    import caft.training

    trainings = []
    real_train = caft.training.train

    def counting_train(*args, **kwargs):
        trainings.append(kwargs.get("concepts"))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(caft.training, "train", counting_train)
    root = tmp_path / "exp"
    config = tiny_config(model_dir, root, methods=ALL_METHODS)
    summary = run_experiment(config, progress=False)

    assert summary.count("finished") == len(ALL_METHODS), summary.statuses
    # plain once (shared by none, test_time_only and discovery) + one per training method
    assert len(trainings) == 1 + 5
    slug = "verbs-sentiment.intended-sentiment"
    results = {m: metrics_of(root, f"{slug}/{m}/seed_0") for m in ALL_METHODS}
    for method, metrics in results.items():
        assert 0 <= metrics["ood_accuracy"] <= 1 and 0 <= metrics["id_accuracy"] <= 1, method
        assert metrics["n_id"] == metrics["n_ood"] == 8
        assert metrics["intended"] == "sentiment" and metrics["ablated"] == "verbs"
    selected = ConceptSet.load(root / "shared" / slug / "seed_0" / "selected")
    assert results["caft_pca"]["directions"]["ids"] == selected.ids()
    assert results["random"]["directions"]["count_by_layer"] == {
        str(k): v for k, v in selected.count_by_layer().items()
    }
    assert results["random"]["directions"]["method"] == "random"
    assert results["top_k"]["directions"]["count_by_layer"] == {"0": 1, "1": 1}
    assert results["random_orthonormal"]["directions"]["count_by_layer"] == {"0": 1, "1": 1}
    assert results["fewer_steps"]["train"]["steps"] == 1  # half of 2
    # test-time ablation: the plain model's numbers with hooks on, reported as its accuracy
    tto = results["test_time_only"]
    assert tto["evaluated_with_hooks"] is True
    assert tto["ood_accuracy"] == tto["hooks"]["test"]["hooks_on_accuracy"]
    assert tto["hooks"]["test"]["hooks_off_accuracy"] == results["none"]["ood_accuracy"]
    assert (
        results["caft_pca"]["hooks"]["test"]["hooks_off_accuracy"]
        == (results["caft_pca"]["ood_accuracy"])
    )
    # one run computed the shared steps; the plain model is deleted once its runs are done
    computed = [m["shared_steps_computed_here"] for m in results.values()]
    assert sum("plain" in c for c in computed) == 1
    assert sum("selection" in c for c in computed) == 1  # the shared step's name
    assert not (root / "shared" / slug / "seed_0" / "plain" / "model").exists()
    assert (root / "results.csv").is_file() and (root / "report.md").is_file()

    before = mtimes(root)
    trainings.clear()
    again = run_experiment(config, progress=False)
    assert again.count("skipped") == len(ALL_METHODS)
    assert trainings == [] and mtimes(root) == before


def test_broken_and_failed_runs_are_redone_and_a_crash_loses_nothing(
    model_dir, tmp_path, monkeypatch
):
    root = tmp_path / "exp"
    config = tiny_config(model_dir, root, methods=["none", "caft_pca", "random"], seeds=[0, 1])

    def crash(ctx):
        raise RuntimeError("simulated crash in the random run")

    broken_method = methods_module.Method("random", "crashes", (), crash)
    monkeypatch.setitem(methods_module.METHODS, "random", broken_method)
    summary = run_experiment(config, progress=False)
    assert summary.count("failed") == 2 and summary.count("finished") == 4
    failed_dir = root / "runs" / "verbs-sentiment.intended-sentiment" / "random" / "seed_0"
    assert run_status(failed_dir) == "failed"
    assert "simulated crash" in (failed_dir / "error.txt").read_text()
    report = (root / "report.md").read_text()
    assert "## Failed runs" in report and "simulated crash" in report

    monkeypatch.undo()  # the real random method again
    finished_before = mtimes(root)
    broken = root / "runs" / "verbs-sentiment.intended-sentiment" / "caft_pca" / "seed_1"
    (broken / "metrics.json").unlink()  # as if killed before writing its result
    assert run_status(broken) == "broken"
    summary = run_experiment(config, progress=False)
    assert summary.count("finished") == 3 and summary.count("skipped") == 3
    assert run_status(failed_dir) == "finished" and not (failed_dir / "error.txt").exists()
    after = mtimes(root)
    redone = {k for k in after if finished_before.get(k) != after[k]}
    assert redone == {
        "runs/verbs-sentiment.intended-sentiment/random/seed_0/metrics.json",
        "runs/verbs-sentiment.intended-sentiment/random/seed_1/metrics.json",
        "runs/verbs-sentiment.intended-sentiment/caft_pca/seed_1/metrics.json",
    }


def test_two_parallel_workers_share_the_plain_fine_tune(model_dir, tmp_path):
    root = tmp_path / "exp"
    config = tiny_config(model_dir, root, methods=["caft_pca", "random"])
    summary = run_experiment(config, parallel=2, progress=False)  # both start at once
    assert summary.count("finished") == 2, summary.statuses
    runs = list(root.glob("runs/*/*/seed_0/metrics.json"))
    computed = [json.loads(path.read_text())["shared_steps_computed_here"] for path in runs]
    assert sum("plain" in c for c in computed) == 1
    assert sum("candidates" in c for c in computed) == 1
    assert all((path.parent / "worker_output.txt").is_file() for path in runs)


def test_the_gender_task_uses_its_written_concept_description(model_dir, tmp_path):
    root = tmp_path / "exp"
    config = tiny_config(model_dir, root, tasks=["gender"], methods=["caft_pca"], n_eval=0)
    assert run_experiment(config, progress=False).count("finished") == 1
    metrics = metrics_of(root, "gender/caft_pca/seed_0")
    assert metrics["id_split"] == "id" and metrics["n_id"] > 8  # n_eval 0: every held-out prompt
    selection = json.loads((root / "shared/gender/seed_0/selection.json").read_text())
    assert "gender_contrast.json" in selection["rule"]


def test_caft_sae_ranks_latents_of_the_plain_fine_tune_and_selects_by_the_rule(model_dir, tmp_path):
    from caft.discovery.sae import SparseAutoencoder

    generator = torch.Generator().manual_seed(0)
    width, d_model = 32, 64
    sae = SparseAutoencoder(
        torch.randn(d_model, width, generator=generator) * 0.5,
        torch.randn(width, generator=generator) * 0.05 - 0.15,
        torch.randn(width, d_model, generator=generator) * 0.3,
        torch.zeros(d_model),
        hook_layer=1,
    )
    sae.save(tmp_path / "sae")
    root = tmp_path / "exp"
    config = tiny_config(
        model_dir, root, methods=["caft_sae", "random"], saes=[str(tmp_path / "sae")],
        sae_top_per_ranking=4,
    )  # fmt: skip
    summary = run_experiment(config, progress=False)
    assert summary.count("finished") == 2, summary.statuses
    shared = root / "shared" / "verbs-sentiment.intended-sentiment" / "seed_0"
    selected = ConceptSet.load(shared / "sae_selected")
    assert selected.provenance.method == "sae" and selected.layers == [1]
    metrics = metrics_of(root, "verbs-sentiment.intended-sentiment/caft_sae/seed_0")
    assert metrics["directions"]["ids"] == selected.ids()
    assert json.loads((shared / "sae_selection.json").read_text())["selected"] == selected.ids()

    no_saes = tiny_config(model_dir, tmp_path / "exp2", methods=["caft_sae"])
    assert run_experiment(no_saes, progress=False).count("failed") == 1
    error = tmp_path / "exp2/runs/verbs-sentiment.intended-sentiment/caft_sae/seed_0/error.txt"
    assert "caft_sae needs SAEs" in error.read_text()


def _compute_shared_step(folder: Path, queue) -> None:
    """A worker of the lock test: a slow shared step that counts how often it is computed."""
    marker, counter = folder / "done", folder / "computed.txt"

    def compute():
        with counter.open("a") as handle:
            handle.write("computed\n")
        time.sleep(1.0)
        marker.write_text("yes")

    queue.put(ensure_shared_step(folder, "step", marker.is_file, compute))


def test_a_shared_step_is_computed_once_by_concurrent_processes(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [
        context.Process(target=_compute_shared_step, args=(tmp_path, queue)) for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert sorted(queue.get(timeout=5) for _ in workers) == [False, False, True]
    assert (tmp_path / "computed.txt").read_text() == "computed\n"


def _hold_lock(path: Path, ready) -> None:
    with file_lock(path):
        ready.set()
        time.sleep(60)


def test_a_lock_dies_with_its_process(tmp_path):
    lock = tmp_path / "locks" / "x.lock"
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    holder = context.Process(target=_hold_lock, args=(lock, ready))
    holder.start()
    assert ready.wait(timeout=30)
    holder.kill()  # no clean-up code runs: the OS must release the lock
    holder.join()
    start = time.perf_counter()
    with file_lock(lock):
        pass
    assert time.perf_counter() - start < 5


def test_killing_the_experiment_and_rerunning_completes_without_redoing_runs(model_dir, tmp_path):
    root = tmp_path / "exp"
    config_path = tmp_path / "grid.yaml"
    settings = tiny_config(model_dir, root, methods=["none", "random"], seeds=[0, 1, 2], steps=6)
    config_path.write_text(yaml.safe_dump(settings.__dict__))
    command = [sys.executable, "-m", "caft", "experiment", str(config_path)]
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not list(root.glob("runs/**/metrics.json")) and time.time() < deadline:
        assert process.poll() is None, "the experiment ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = mtimes(root)
    assert 1 <= len(finished) < 6, f"kill should land mid-grid; finished: {sorted(finished)}"

    summary = run_experiment(load_experiment_config(config_path), progress=False)
    after = mtimes(root)
    assert len(after) == 6 and summary.count("skipped") == len(finished)
    assert all(after[k] == v for k, v in finished.items())  # finished runs were not redone


def test_tasks_parse_from_names_all_and_own_data(tmp_path):
    tasks = parse_tasks(["gender", "verbs|SENTIMENT", {"setting": "PRONOUNS|sports"}])
    assert [t.kind for t in tasks] == ["gender", "double_mc", "double_mc"]
    assert tasks[1].slug == "verbs-sentiment.intended-sentiment"
    assert len(parse_tasks(["double_mc:all"])) == 16
    assert len({t.slug.lower() for t in parse_tasks(["double_mc:all"])}) == 16
    with pytest.raises(CaftError, match=r"tasks\[0\].*capitals"):
        parse_tasks(["verbs|sentiment"])
    with pytest.raises(CaftError, match="twice"):
        parse_tasks(["verbs|SENTIMENT", "VERBS|sentiment", "verbs|SENTIMENT"])
    with pytest.raises(CaftError, match="unknown key"):
        parse_tasks([{"setting": "verbs|SENTIMENT", "rows_c": "x.csv"}])


def test_plan_goes_seed_by_seed_with_runs_needing_shared_steps_first():
    config = ExperimentConfig(
        tasks=["gender"], methods=["none", "fewer_steps", "random", "caft_pca"], seeds=[0, 1]
    )
    order = [(run.method, run.seed) for run in plan_runs(config)]
    assert [seed for _, seed in order] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert order[0] == ("caft_pca", 0) and order[4] == ("caft_pca", 1)
    assert order[3] == ("fewer_steps", 0) and order[-1] == ("fewer_steps", 1)


def test_config_errors_are_clear(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("tasks: [gender]\nmethods: [none, magic]\n")
    with pytest.raises(CaftError, match="Unknown method 'magic'"):
        load_experiment_config(path)
    path.write_text("tasks: [gender]\nlearning_rat: 1.0e-5\n")
    with pytest.raises(CaftError, match=r"unknown setting.*learning_rat"):
        load_experiment_config(path)
    path.write_text("tasks: [gender]\nseeds: 3\n")
    assert load_experiment_config(path).seed_list() == [0, 1, 2]


def test_resuming_with_other_settings_is_refused_but_the_grid_may_grow(tmp_path):
    config = ExperimentConfig(output_dir=str(tmp_path), tasks=["gender"], methods=["none"])
    prepare_experiment(config)
    grown = ExperimentConfig(
        output_dir=str(tmp_path), tasks=["gender"], methods=["none", "random"], seeds=[0, 1, 5]
    )
    assert len(prepare_experiment(grown)) == 6
    with pytest.raises(CaftError, match=r"learning_rate: 2e-05 -> 0\.001"):
        prepare_experiment(ExperimentConfig(output_dir=str(tmp_path), learning_rate=1e-3))


def test_a_methods_own_settings_may_change_until_one_of_its_runs_starts(tmp_path):
    config = ExperimentConfig(output_dir=str(tmp_path), tasks=["gender"], methods=["none"])
    prepare_experiment(config)
    extended = replace(config, methods=["none", "top_k"], baseline_k=2, fewer_steps_fraction=0.25)
    (top_k_run,) = [r for r in prepare_experiment(extended) if r.method == "top_k" and r.seed == 0]
    (top_k_run.run_dir(tmp_path) / "log.txt").write_text("started\n")
    with pytest.raises(CaftError, match=r"baseline_k: 2 -> 3"):
        prepare_experiment(replace(extended, baseline_k=3))
    prepare_experiment(replace(extended, fewer_steps_fraction=0.75))  # no fewer_steps run yet


def test_only_selects_runs_by_pattern():
    config = ExperimentConfig(tasks=["gender"], methods=["none", "caft_pca"], seeds=[0, 1])
    runs = plan_runs(config)
    chosen = select_runs(runs, ["gender/*/seed_1"])
    assert {r.run_id for r in chosen} == {"gender/none/seed_1", "gender/caft_pca/seed_1"}
    with pytest.raises(CaftError, match="no run of this experiment matches"):
        select_runs(runs, ["gender/top_k/*"])


def test_run_one_runs_a_folder_and_refuses_other_folders(model_dir, tmp_path, capsys):
    root = tmp_path / "exp"
    config = tiny_config(model_dir, root, methods=["none"])
    spec = prepare_experiment(config)[0]
    assert main(["run-one", str(spec.run_dir(root)), "--no-progress"]) == 0
    assert run_status(spec.run_dir(root)) == "finished"
    assert execute_run(spec.run_dir(root)) == "skipped"
    assert main(["run-one", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_plan_prints_one_command_per_unfinished_run(model_dir, tmp_path, capsys):
    config_path = tmp_path / "grid.yaml"
    settings = tiny_config(model_dir, tmp_path / "exp", methods=["none", "random"], seeds=[0, 1])
    config_path.write_text(yaml.safe_dump(settings.__dict__))
    assert main(["experiment", str(config_path), "--plan"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(" run-one " in line for line in lines)
    assert lines[0].endswith("--threads 1")


def test_a_run_spec_names_its_folders(tmp_path):
    spec = RunSpec(TaskSpec("double_mc", "sentiment|VERBS"), "caft_pca", 2)
    assert spec.run_id == "sentiment-verbs.intended-verbs/caft_pca/seed_2"
    assert spec.shared_dir(tmp_path) == tmp_path / "shared/sentiment-verbs.intended-verbs/seed_2"


def test_base_model_tensors_untouched_by_runs(model_dir, tmp_path):
    """Fine-tunes work on copies: the cached base model is the same after a run."""
    from caft.experiments.runner import _load_base

    config = tiny_config(model_dir, tmp_path / "exp", methods=["none"])
    base, _ = _load_base(str(model_dir), "cpu")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    run_experiment(config, progress=False)
    after = _load_base(str(model_dir), "cpu")[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    ("name", "n_runs"), [("double_mc_cpu.yaml", 4 * 3 * 3), ("double_mc_gemma2_gpu.yaml", 640)]
)
def test_the_example_configs_are_valid(name, n_runs):
    config = load_experiment_config(REPO / "examples" / "experiments" / name)
    assert len(plan_runs(config)) == n_runs


def test_report_only_needs_an_experiment(model_dir, tmp_path, capsys):
    config_path = tmp_path / "grid.yaml"
    settings = tiny_config(model_dir, tmp_path / "exp", methods=["none"])
    config_path.write_text(yaml.safe_dump(settings.__dict__))
    assert main(["experiment", str(config_path), "--report-only"]) == 2
    assert "holds no experiment yet" in capsys.readouterr().err
