"""Settings: environment parsing, validation messages naming the variable, derived defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.settings import Settings, SettingsError, load_settings


def test_defaults_serve_one_machine_with_local_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("REALSCORE_"):
            monkeypatch.delenv(name)
    settings = load_settings()
    assert settings.broker_url == "redis://127.0.0.1:6379/0"
    assert settings.local_roots == []
    assert settings.task_concurrency == 4 * settings.max_batch_size
    assert settings.high_score_means == "real"


def test_environment_is_read_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REALSCORE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("REALSCORE_LOCAL_ROOTS", '["/data/media", "/srv/img"]')
    monkeypatch.setenv("REALSCORE_DEVICE", "cuda:1")
    monkeypatch.setenv("REALSCORE_HIGH_SCORE_MEANS", "ai")
    settings = load_settings()
    assert settings.max_batch_size == 8
    assert settings.task_concurrency == 32
    assert settings.local_roots == [Path("/data/media"), Path("/srv/img")]
    assert settings.device == "cuda:1"
    assert settings.high_score_means == "ai"
    assert "high_score_means" in settings.model_fields_set


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REALSCORE_MAX_BATCH_SIZE", "zero"),
        ("REALSCORE_MAX_BATCH_SIZE", "0"),
        ("REALSCORE_DEVICE", "tpu"),
        ("REALSCORE_DTYPE", "float8"),
        ("REALSCORE_THRESHOLD", "1.5"),
        ("REALSCORE_HIGH_SCORE_MEANS", "fake"),
        ("REALSCORE_FETCH_TIMEOUT", "-1"),
        ("REALSCORE_SWITCH_INTERVAL_MS", "0"),
    ],
)
def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(name + ":")
    assert "\n" not in message


def test_bad_json_list_is_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REALSCORE_LOCAL_ROOTS", "/data/media")  # not a JSON array
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value).startswith("REALSCORE_LOCAL_ROOTS: not valid JSON")


def test_settings_are_immutable() -> None:
    settings = Settings()
    with pytest.raises(Exception):
        settings.max_batch_size = 3  # type: ignore[misc]
