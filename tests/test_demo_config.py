"""The demo's settings: --quick shrinks the run; a run is only resumed with the same settings."""

from __future__ import annotations

import dataclasses
import json

import pytest

from caft.errors import CaftError
from caft.experiments.demo import DemoConfig, check_resumable


def test_quick_shrinks_the_run_and_keeps_other_settings():
    config = DemoConfig(quick=True, learning_rate=3e-5).effective()
    assert config.steps <= 6 and config.n_eval <= 24 and config.pca_sequences <= 32
    assert config.learning_rate == 3e-5
    assert DemoConfig().effective() == DemoConfig()


def test_resuming_with_the_same_settings_is_allowed(tmp_path):
    config = DemoConfig(output_dir=str(tmp_path))
    (tmp_path / "demo_config.json").write_text(json.dumps(dataclasses.asdict(config)))
    check_resumable(tmp_path, dataclasses.replace(config, seeds=3, threads=1))


def test_resuming_with_other_settings_names_what_changed(tmp_path):
    config = DemoConfig(output_dir=str(tmp_path))
    (tmp_path / "demo_config.json").write_text(json.dumps(dataclasses.asdict(config)))
    with pytest.raises(CaftError, match=r"steps: 100 -> 50.*another --output-dir"):
        check_resumable(tmp_path, dataclasses.replace(config, steps=50))


def test_a_fresh_output_dir_needs_no_check(tmp_path):
    check_resumable(tmp_path / "new", DemoConfig())
