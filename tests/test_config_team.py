"""Unit tests for the team settings of StudyConfig: a live worker's heartbeat must never
look stale, so grace_period must be longer than heartbeat_interval."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mnist_track.config import ConfigError, StudyConfig, load_study_config

LR_SPACE = {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}


def write_study(folder: Path, **settings) -> Path:
    path = folder / "team.yaml"
    path.write_text(yaml.safe_dump({"search_space": LR_SPACE, **settings}))
    return path


@pytest.mark.parametrize(("interval", "grace"), [(5, 5), (10, 4), (2, 1)])
def test_grace_period_not_longer_than_the_interval_is_rejected(tmp_path, interval, grace):
    path = write_study(tmp_path, heartbeat_interval=interval, grace_period=grace)
    with pytest.raises(ConfigError) as caught:
        load_study_config(path, {})
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert "grace_period" in message and "heartbeat_interval" in message
    assert f"({grace})" in message and f"({interval})" in message


def test_an_override_can_make_the_pair_invalid(tmp_path):
    path = write_study(tmp_path, heartbeat_interval=5, grace_period=20)
    with pytest.raises(ConfigError, match="grace_period.*heartbeat_interval"):
        load_study_config(path, {"heartbeat_interval": 30})


@pytest.mark.parametrize(("interval", "grace"), [(5, 6), (1, 2), (10, 60)])
def test_grace_period_longer_than_the_interval_is_accepted(tmp_path, interval, grace):
    path = write_study(tmp_path, heartbeat_interval=interval, grace_period=grace)
    study = load_study_config(path, {})
    assert (study.heartbeat_interval, study.grace_period) == (interval, grace)


def test_the_defaults_are_a_valid_pair():
    study = StudyConfig(study_name="s", search_space=LR_SPACE)
    assert study.grace_period > study.heartbeat_interval


@pytest.mark.parametrize("key", ["heartbeat_interval", "grace_period"])
@pytest.mark.parametrize("value", [0, -1])
def test_team_timings_must_be_positive(tmp_path, key, value):
    settings = {"heartbeat_interval": 1, "grace_period": 100} | {key: value}
    path = write_study(tmp_path, **settings)
    with pytest.raises(ConfigError) as caught:
        load_study_config(path, {})
    assert key in str(caught.value)
