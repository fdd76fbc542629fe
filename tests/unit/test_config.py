import pytest

from ortserve.config import Settings, SettingsError, parse_duration, parse_host


def test_defaults():
    settings = Settings.from_env({})
    assert settings.address == "127.0.0.1:11434"
    assert settings.keep_alive == 300
    assert (settings.max_loaded_models, settings.num_parallel, settings.max_queue) == (3, 8, 64)
    assert settings.provider == "auto"


def test_every_variable_is_read():
    settings = Settings.from_env({
        "ORTSERVE_MODELS": "/tmp/lib", "ORTSERVE_HOST": ":8080", "ORTSERVE_KEEP_ALIVE": "1h30m",
        "ORTSERVE_MAX_LOADED_MODELS": "2", "ORTSERVE_NUM_PARALLEL": "4",
        "ORTSERVE_ENGINE_LANES": "1", "ORTSERVE_MAX_QUEUE": "9", "ORTSERVE_PROVIDER": "CPU",
        "ORTSERVE_THREADS": "5", "ORTSERVE_GRACE_PERIOD": "10s",
    })  # fmt: skip
    assert str(settings.models) == "/tmp/lib"
    assert settings.address == "127.0.0.1:8080"
    assert settings.keep_alive == 5400
    assert (settings.max_loaded_models, settings.num_parallel, settings.engine_lanes) == (2, 4, 1)
    assert (settings.max_queue, settings.provider, settings.threads) == (9, "cpu", 5)
    assert settings.grace_period == 10


@pytest.mark.parametrize(
    "variable, value",
    [
        ("ORTSERVE_HOST", "localhost:99999"),
        ("ORTSERVE_KEEP_ALIVE", "soon"),
        ("ORTSERVE_NUM_PARALLEL", "0"),
        ("ORTSERVE_MAX_QUEUE", "many"),
        ("ORTSERVE_PROVIDER", "tpu"),
        ("ORTSERVE_GRACE_PERIOD", "x"),
    ],
)
def test_a_bad_value_names_the_variable(variable, value):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({variable: value})
    assert info.value.message.startswith(f"{variable}={value!r} is invalid")


def test_models_must_be_a_directory(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(SettingsError, match="ORTSERVE_MODELS"):
        Settings.from_env({"ORTSERVE_MODELS": str(file)})


@pytest.mark.parametrize(
    "text, seconds",
    [("5m", 300), ("30s", 30), ("1h", 3600), ("250ms", 0.25), ("300", 300), (-1, -1), (0, 0)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_hosts():
    assert parse_host("0.0.0.0") == ("0.0.0.0", 11434)
    assert parse_host("http://[::1]:8000/") == ("::1", 8000)
