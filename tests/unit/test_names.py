import pytest

from ortserve.errors import InvalidName
from ortserve.library.names import ModelName


@pytest.mark.parametrize(
    "text, display, key",
    [
        ("llama3", "llama3:latest", ("library", "llama3", "latest")),
        ("llama3:8b", "llama3:8b", ("library", "llama3", "8b")),
        ("Me/My-Model.v2:Q_4", "Me/My-Model.v2:Q_4", ("me", "my-model.v2", "q_4")),
        ("library/phi3", "phi3:latest", ("library", "phi3", "latest")),
        ("hf.co/org/repo:int4", "hf.co/org/repo:int4", ("hf.co", "org", "repo", "int4")),
        ("  padded  ", "padded:latest", ("library", "padded", "latest")),
        ("c:model", "c:model", ("library", "c", "model")),
    ],
)
def test_valid_names(text, display, key):
    name = ModelName.parse(text)
    assert name.display == display
    assert name.key == key


def test_names_compare_case_insensitively():
    assert ModelName.parse("Qwen:Latest").key == ModelName.parse("qwen").key


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("..", "'..'"),
        ("../etc/passwd", "'..'"),
        ("a/../../b", "'..'"),
        ("/etc/passwd", "absolute"),
        ("C:/models/x", "absolute"),
        ("a\\b", "backslash"),
        ("a\0b", "NUL"),
        ("a//b", "empty part"),
        ("a/", "empty part"),
        ("a/b/c/d", "namespace/"),
        ("-dash", "must start with a letter or digit"),
        (".hidden", "must start with a letter or digit"),
        ("bad name", "must start with a letter or digit"),
        ("model:bad tag", "invalid tag"),
        ("model:", "invalid tag"),
        ("x" * 81, "at most 80"),
    ],
)
def test_rejected_names_say_why(text, fragment):
    with pytest.raises(InvalidName) as info:
        ModelName.parse(text)
    assert fragment in info.value.message
    assert info.value.param == "model"


def test_non_string_is_rejected():
    with pytest.raises(InvalidName):
        ModelName.parse(None)  # type: ignore[arg-type]
