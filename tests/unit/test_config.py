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
    assert info.value.message.startswith(f"{variable} must be ")
    assert info.value.message.endswith(f", got {value!r}")
    assert "invalid literal" not in info.value.message


@pytest.mark.parametrize(
    "env, message",
    [
        ({"ORTSERVE_NUM_PARALLEL": "zero"},
         "ORTSERVE_NUM_PARALLEL must be a whole number, got 'zero'"),
        ({"ORTSERVE_MAX_QUEUE": "0"}, "ORTSERVE_MAX_QUEUE must be a whole number of 1 or more, got '0'"),
        ({"OLLAMA_MAX_QUEUE": "lots"}, "OLLAMA_MAX_QUEUE must be a whole number, got 'lots'"),
        ({"OLLAMA_KEEP_ALIVE": "soon"},
         "OLLAMA_KEEP_ALIVE must be a duration such as 30s, 5m or 1h30m, or seconds, got 'soon'"),
        ({"OLLAMA_NOHISTORY": "maybe"}, "OLLAMA_NOHISTORY must be true or false (1 or 0), got 'maybe'"),
        ({"ORTSERVE_API_KEYS": "alice:short-key"},
         "ORTSERVE_API_KEYS is invalid: key 'alice' is shorter than 16 characters"),
    ],
)  # fmt: skip
def test_messages_are_ortserves_own_words_naming_the_variable_read(env, message):
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert info.value.message == message  # a key's value is never repeated


def test_ollamas_variables_are_read_when_ortserves_are_unset():
    ollama = {
        "OLLAMA_HOST": "0.0.0.0:8080", "OLLAMA_KEEP_ALIVE": "-1", "OLLAMA_NUM_PARALLEL": "2",
        "OLLAMA_MAX_LOADED_MODELS": "1", "OLLAMA_MAX_QUEUE": "7",
        "OLLAMA_ORIGINS": "app://*,https://x.example", "OLLAMA_CONTEXT_LENGTH": "8192",
        "OLLAMA_NOHISTORY": "1",
    }  # fmt: skip
    settings = Settings.from_env(ollama)
    assert (settings.host, settings.port, settings.keep_alive) == ("0.0.0.0", 8080, -1)
    assert (settings.num_parallel, settings.max_loaded_models, settings.max_queue) == (2, 1, 7)
    assert settings.origins == ("app://*", "https://x.example")
    assert (settings.context_length, settings.nohistory) == (8192, True)
    assert len(settings.env_notes) == len(ollama)  # each one said in the server's log
    assert "ORTSERVE_NUM_PARALLEL is unset: using OLLAMA_NUM_PARALLEL='2'" in settings.env_notes
    # ortserve's own name wins when set; an empty one counts as unset
    both = Settings.from_env({**ollama, "ORTSERVE_NUM_PARALLEL": "5", "ORTSERVE_HOST": ""})
    assert (both.num_parallel, both.port) == (5, 8080)
    assert not any("NUM_PARALLEL" in note for note in both.env_notes)


def test_ollamas_zero_means_its_automatic_choice():
    settings = Settings.from_env({"OLLAMA_NUM_PARALLEL": "0", "OLLAMA_MAX_LOADED_MODELS": "0"})
    assert (settings.num_parallel, settings.max_loaded_models) == (8, 3)
    assert "OLLAMA_NUM_PARALLEL=0 (Ollama's automatic choice)" in " ".join(settings.env_notes)


def test_context_length_is_the_default_num_ctx():
    from ortserve.engine.sampling import resolve
    from ortserve.engine.types import GenerationOptions
    from ortserve.options import Sampling

    assert Settings.from_env({}).context_length == GenerationOptions().num_ctx == 4096
    assert Settings.from_env({"ORTSERVE_CONTEXT_LENGTH": "2048"}).context_length == 2048
    assert (
        resolve(Sampling(), Sampling(), context_length=32768, default_context=8192).num_ctx == 8192
    )
    assert (
        resolve(Sampling(), Sampling(), context_length=1024, default_context=8192).num_ctx == 1024
    )
    given = resolve(Sampling(num_ctx=512), Sampling(), context_length=32768, default_context=8192)
    assert given.num_ctx == 512


def test_every_settings_field_has_a_variable():
    from dataclasses import fields

    from ortserve.config import VARIABLES

    named = set()
    for variable in VARIABLES:
        named |= set(variable.field if isinstance(variable.field, tuple) else [variable.field])
    derived = {"env_notes"}
    assert {f.name for f in fields(Settings)} - derived <= named


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


def test_the_table_and_the_docs_name_the_same_variables():
    import re
    from pathlib import Path

    from ortserve.config import VARIABLES

    names = [variable.name for variable in VARIABLES]
    assert len(names) == len(set(names))
    docs = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    assert set(re.findall(r"^\| `(ORTSERVE_[A-Z0-9_]+)`", docs, re.MULTILINE)) == set(names)


def test_a_keep_alive_too_long_to_be_a_date_is_forever():
    """ORTSERVE_KEEP_ALIVE=99999999999999h would overflow the keep-alive timer's wait and
    /api/ps's expiry date, as a request's keep_alive 1e300 did (issue 20, item 1)."""
    assert Settings.from_env({"ORTSERVE_KEEP_ALIVE": "99999999999999h"}).keep_alive == -1.0
    assert Settings.from_env({"ORTSERVE_KEEP_ALIVE": "10m"}).keep_alive == 600.0
