"""The `caft` command: help texts, clean errors (exit 2, no traceback), config files with flag
overrides, and `caft select --indices` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from caft.cli import build_parser, main
from caft.concepts import ConceptSet, Provenance
from caft.config import apply_config_file, dataclass_from_args
from caft.experiments.demo import DemoConfig
from caft.models import hidden_size
from caft.training import TrainConfig


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _fails(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("caft: error: ")
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("argv", "options"),
    [
        ([], ["demo", "train", "eval", "discover", "select"]),
        (["demo"], ["--quick", "--steps", "--seeds", "--output-dir", "--config", "--no-quick"]),
        (["train"], ["--output-dir", "--ablate", "--chat-data", "--method", "--config"]),
        (["eval"], ["--model", "--templates", "--concepts", "--n-eval", "--output"]),
        (["discover"], ["pca"]),
        (["discover", "pca"], ["--finetuned", "--layers", "--n-components", "--corpus"]),
        (["select"], ["--candidates", "--indices", "--contrast", "--max-per-layer"]),
    ],
    ids=["caft", "demo", "train", "eval", "discover", "discover-pca", "select"],
)
def test_help_exits_zero_and_lists_key_options(capsys, argv, options):
    text = _help(capsys, argv)
    for option in options:
        assert option in text


def test_missing_required_option_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["select", "--candidates", "x"])
    assert exit_info.value.code == 2
    assert "--output-dir" in capsys.readouterr().err


def test_select_with_both_indices_and_contrast_fails_cleanly(capsys, tmp_path):
    argv = ["select", "--candidates", str(tmp_path), "--output-dir", str(tmp_path / "out")]
    err = _fails(capsys, [*argv, "--indices", "L0.0", "--contrast", "c.json"])
    assert "exactly one of --indices" in err


def test_select_from_a_folder_that_is_not_a_concept_set_fails_cleanly(capsys, tmp_path):
    folder = tmp_path / "not-a-folder"
    argv = [
        "select",
        "--candidates",
        str(folder),
        "--indices",
        "L0.0",
        "--output-dir",
        str(tmp_path / "X"),
    ]
    err = _fails(capsys, argv)
    assert f"{folder} is not a caft concept set" in err
    assert not (tmp_path / "X").exists()


def test_train_config_with_unknown_key_names_key_and_file(capsys, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("max_steps: 2\nlerning_rate: 0.1\n")
    err = _fails(capsys, ["train", "--output-dir", str(tmp_path), "--config", str(config)])
    assert "lerning_rate" in err and str(config) in err and "learning_rate" in err


def test_unreadable_and_non_mapping_config_files_fail_cleanly(capsys, tmp_path):
    err = _fails(capsys, ["demo", "--config", str(tmp_path / "missing.yaml")])
    assert "Cannot read config file" in err and "missing.yaml" in err
    listing = tmp_path / "list.yaml"
    listing.write_text("- steps\n- 3\n")
    err = _fails(capsys, ["demo", "--config", str(listing)])
    assert "expected a mapping" in err


def test_train_with_missing_concepts_fails_before_loading_a_model(capsys, tmp_path):
    err = _fails(capsys, ["train", "--output-dir", str(tmp_path), "--ablate", "nowhere"])
    assert "--ablate/--concepts nowhere: no such folder or selection file" in err


def test_config_file_sets_defaults_and_flags_override(tmp_path):
    config = tmp_path / "demo.yaml"
    config.write_text("steps: 3\nlearning-rate: 0.5\nquick: true\n")
    for argv, steps in (([], 3), (["--steps", "7"], 7)):
        parser, sub = build_parser()
        full = ["demo", "--config", str(config), *argv]
        apply_config_file(sub["demo"], full, DemoConfig)
        result = dataclass_from_args(DemoConfig, parser.parse_args(full))
        assert result.steps == steps
        assert result.learning_rate == 0.5 and result.quick is True
        assert result.seeds == DemoConfig.seeds


def test_demo_flags_without_config_give_the_dataclass_defaults():
    parser, _ = build_parser()
    result = dataclass_from_args(DemoConfig, parser.parse_args(["demo", "--no-quick"]))
    assert result == DemoConfig()


def test_select_indices_end_to_end(capsys, tmp_path, model):
    width = hidden_size(model)
    raw = {
        layer: torch.randn(2, width, generator=torch.Generator().manual_seed(layer))
        for layer in (0, 1)
    }
    candidates = ConceptSet(raw, provenance=Provenance(model="tiny", method="pca"))
    candidates.save(tmp_path / "candidates")
    out = tmp_path / "selection"
    argv = ["select", "--candidates", str(tmp_path / "candidates"), "--indices", "L0.0,L1.1"]
    assert main([*argv, "--output-dir", str(out)]) == 0
    assert "Selected L0.0, L1.1" in capsys.readouterr().out
    data = json.loads((out / "selection.json").read_text())
    assert data["selected"] == ["L0.0", "L1.1"]
    assert data["rule"].startswith("human") and data["scores"] == []
    assert data["candidates"] == str((tmp_path / "candidates").resolve())
    selected = ConceptSet.load(out / "selected")
    assert selected.ids() == ["L0.0", "L1.1"]
    assert all(info.selected_by == data["rule"] for info in selected.infos)
    for identifier in ("L0.0", "L1.1"):
        torch.testing.assert_close(selected.direction(identifier), candidates.direction(identifier))
    selected.check_compatible(model)


def test_select_unknown_index_lists_the_candidates(capsys, tmp_path):
    ConceptSet({0: torch.randn(2, 8)}).save(tmp_path / "candidates")
    argv = ["select", "--candidates", str(tmp_path / "candidates"), "--indices", "L0.0,L3.0"]
    err = _fails(capsys, [*argv, "--output-dir", str(tmp_path / "out")])
    assert "Unknown direction(s) L3.0" in err and "L0.0, L0.1" in err


def test_shipped_example_demo_config_is_accepted():
    example = Path(__file__).resolve().parents[1] / "examples" / "demo.yaml"
    if not example.is_file():
        pytest.skip("examples/demo.yaml is not there")
    parser, sub = build_parser()
    argv = ["demo", "--config", str(example), "--seeds", "1"]
    apply_config_file(sub["demo"], argv, DemoConfig)
    result = dataclass_from_args(DemoConfig, parser.parse_args(argv))
    assert result.seeds == 1 and result.output_dir != DemoConfig.output_dir


def test_train_config_file_may_hold_command_options(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nmax_steps: 3\nprofessions: all\n")
    parser, sub = build_parser()
    argv = ["train", "--config", str(config), "--max-steps", "5"]
    apply_config_file(sub["train"], argv, TrainConfig)
    args = parser.parse_args(argv)
    assert args.output_dir == str(tmp_path / "run")
    assert args.professions == "all" and args.max_steps == 5


def test_train_without_output_dir_fails_cleanly(capsys):
    err = _fails(capsys, ["train", "--max-steps", "1"])
    assert "--output-dir" in err
