"""create_model on a real library: shared bundles, merged values, bases, errors, atomicity.

The bundles here are small directories with a real genai_config.json and chat template but
no real graph: create never loads a model (tests/integration/test_create.py serves them).
"""

from __future__ import annotations

import hashlib
import io
import sys
import types

import pytest

from ortserve.errors import InvalidName, InvalidRequest, ModelNotFound
from ortserve.library.modelfile import ModelfileError, ModelSpec, parse_modelfile, render_modelfile
from ortserve.models.create import create_model
from tests.support.bundles import TEMPLATE, write_bundle


def bundle_dirs(library):
    return sorted(p.name for p in library.bundles_dir.iterdir())


def model_fields(manifest):
    return {k: v for k, v in manifest.items() if k not in ("name", "created", "modified")}


def test_from_a_library_model_shares_its_bundle_and_overrides(library, base):
    spec = parse_modelfile(
        "FROM base\nSYSTEM Be a pirate.\nPARAMETER temperature 0\nPARAMETER stop x\n"
        "MESSAGE user new example\nMESSAGE assistant arr\n",
        ".",
    )
    statuses = []
    info = create_model(library, "pirate", spec, progress=statuses.append)
    assert info.digest == base.digest and bundle_dirs(library) == [base.digest]
    m = info.manifest
    assert m["system"] == "Be a pirate."
    assert m["parameters"] == {"temperature": 0, "top_k": 20, "stop": ["x"]}  # merged
    assert m["messages"] == [{"role": "user", "content": "new example"},
                             {"role": "assistant", "content": "arr"}]  # fmt: skip
    assert m["details"] == base.details and m["template"] == base.manifest["template"]
    assert m["license"] == "Apache 2.0"
    assert m["created"] != base.manifest["created"]
    assert statuses == [f"using existing layer {base.digest.replace('-', ':', 1)}",
                        "writing manifest", "success"]  # fmt: skip
    assert library.get("base").manifest == base.manifest  # the base is untouched


def test_values_left_out_keep_the_bases(library, base):
    info = create_model(library, "same", ModelSpec(from_="base"))
    assert model_fields(info.manifest) == model_fields(base.manifest)


def test_empty_system_clears_and_license_lines_join(library, base):
    spec = parse_modelfile('FROM base\nSYSTEM ""\nLICENSE one\nLICENSE two\n', ".")
    info = create_model(library, "cleared", spec)
    assert info.manifest["system"] is None
    assert info.manifest["license"] == "one\ntwo"


def test_show_modelfile_round_trips_to_an_identical_manifest(library, base):
    spec = parse_modelfile(
        'FROM base\nSYSTEM """Two\nlines with "quotes"."""\nPARAMETER stop "a b"\n'
        "PARAMETER stop </s>\nMESSAGE assistant ' padded '\nLICENSE MIT\n",
        ".",
    )
    first = create_model(library, "first", spec)
    text = render_modelfile(first)
    assert f"FROM {first.path}" in text
    again = create_model(library, "again", parse_modelfile(text, "/"))
    assert again.digest == first.digest and bundle_dirs(library) == [base.digest]
    assert model_fields(again.manifest) == model_fields(first.manifest)
    # and re-creating the same name from its own Modelfile changes nothing but the times
    same = create_model(library, "first", parse_modelfile(text, "/"))
    assert model_fields(same.manifest) == model_fields(first.manifest)


def test_from_an_outside_bundle_directory_adds_it(library, tmp_path):
    folder = write_bundle(tmp_path / "outside", b"other weights")
    (tmp_path / "Modelfile").write_text("FROM ./outside\nPARAMETER num_ctx 64\n")
    spec = parse_modelfile((tmp_path / "Modelfile").read_text(), tmp_path)
    statuses = []
    info = create_model(library, "outside", spec, progress=statuses.append)
    assert info.path.parent == library.bundles_dir
    assert (info.path / "model.onnx").read_bytes() == b"other weights"
    assert folder.is_dir()  # the source is copied, not moved
    assert info.manifest["template"] == TEMPLATE and info.capabilities == ["completion"]
    assert info.manifest["parameters"] == {"num_ctx": 64}
    assert info.manifest["source"] == {"source": str(folder.resolve())}
    assert statuses[0] == f"copying bundle {folder.resolve()}"
    assert statuses[1].startswith("creating new layer sha256:")
    assert not any(library.tmp_dir.iterdir())  # staging is cleaned up


def test_a_name_that_exists_is_replaced(library, base):
    create_model(library, "target", parse_modelfile("FROM base\nSYSTEM one\n", "."))
    info = create_model(library, "target", parse_modelfile("FROM base\nSYSTEM two\n", "."))
    assert library.get("target").manifest["system"] == "two" == info.manifest["system"]
    assert [m.name for m in library.list()].count("target:latest") == 1


def test_unknown_from(library):
    with pytest.raises(ModelfileError, match=r"Modelfile line 2: FROM nothing: no library model"):
        create_model(library, "x", parse_modelfile("# c\nFROM nothing\n", "/nonexistent"))
    with pytest.raises(ModelNotFound):
        create_model(library, "x", ModelSpec(from_="nothing"))
    with pytest.raises(InvalidRequest, match="from is required"):
        create_model(library, "x", ModelSpec())


def test_from_a_directory_that_is_neither(library, tmp_path):
    (tmp_path / "junk").mkdir()
    spec = parse_modelfile("FROM ./junk\n", tmp_path)
    with pytest.raises(InvalidRequest, match=r"Modelfile line 1: FROM .*junk: not an ONNX GenAI"):
        create_model(library, "x", spec)


def test_a_template_must_render(library, base):
    spec = parse_modelfile("FROM base\n\nTEMPLATE {% for m in messages %}{{ m.content }\n", ".")
    with pytest.raises(InvalidRequest) as err:
        create_model(library, "x", spec)
    assert err.value.param == "template"
    assert err.value.message.startswith("Modelfile line 3: template: invalid chat template")
    assert "Jinja" in err.value.message
    spec = ModelSpec(from_="base", template="{{ raise_exception('no') }}")
    with pytest.raises(InvalidRequest, match="^template: no"):
        create_model(library, "x", spec)
    assert not library.exists("x")


def test_a_template_decides_the_tools_capability(library, base):
    tools = "{% if tools %}{{ tools | tojson }}{% endif %}" + TEMPLATE
    info = create_model(library, "t", ModelSpec(from_="base", template=tools))
    assert info.capabilities == ["completion", "tools"]
    info = create_model(library, "t", ModelSpec(from_="t", template=TEMPLATE))
    assert info.capabilities == ["completion"]


def test_bad_name_and_quantize(library, base):
    with pytest.raises(InvalidName):
        create_model(library, "../evil", ModelSpec(from_="base"))
    with pytest.raises(InvalidRequest, match='quantize: "q5_K_M" is not one of'):
        create_model(library, "x", ModelSpec(from_="base"), quantize="q5_K_M")
    with pytest.raises(InvalidRequest, match=r"already quantized \(int4\)"):
        create_model(library, "x", ModelSpec(from_="base"), quantize="q4_K_M")
    assert bundle_dirs(library) == [base.digest] and not library.exists("x")


def test_parameters_from_the_api_are_checked(library, base):
    with pytest.raises(InvalidRequest, match='unknown option "nope"') as err:
        create_model(library, "x", ModelSpec(from_="base", parameters={"nope": 1}))
    assert err.value.param == "parameters.nope"
    with pytest.raises(InvalidRequest, match="parameters.num_predict"):
        create_model(library, "x", ModelSpec(from_="base", parameters={"num_predict": "3"}))
    info = create_model(library, "x", ModelSpec(from_="base", parameters={"stop": "END"}))
    assert info.manifest["parameters"]["stop"] == ["END"]


def test_files_from_blobs_make_a_bundle(library, tmp_path):
    folder = write_bundle(tmp_path / "upload", b"uploaded weights")
    files = {}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        library.add_blob(io.BytesIO(data), digest)
        files[path.name] = digest
    info = create_model(library, "uploaded", ModelSpec(files=files, system="hi"))
    assert (info.path / "model.onnx").read_bytes() == b"uploaded weights"
    assert info.manifest["system"] == "hi" and info.manifest["source"] == {"source": "upload"}
    assert info.manifest["template"] == TEMPLATE


def test_files_are_checked_before_any_work(library):
    digest = "sha256:" + "0" * 64
    with pytest.raises(InvalidRequest, match="is not on the server") as err:
        create_model(library, "x", ModelSpec(files={"model.onnx": digest}))
    assert err.value.param == "files"
    data = b"x"
    good = "sha256:" + hashlib.sha256(data).hexdigest()
    library.add_blob(io.BytesIO(data), good)
    for bad in ("../escape", "/abs", "a/../../b", "c:\\x", ""):
        with pytest.raises(InvalidRequest, match="files: invalid file name"):
            create_model(library, "x", ModelSpec(files={bad: good}))
    with pytest.raises(InvalidRequest, match="files: neither an ONNX GenAI bundle"):
        create_model(library, "x", ModelSpec(files={"notes.txt": good}))
    assert not library.exists("x") and not any(library.tmp_dir.iterdir())


def test_adapter_lines_are_handed_to_attach_adapters(library, base, tmp_path, monkeypatch):
    """The adapters themselves are tested with adapters.py; here: what create passes on."""
    (tmp_path / "my.onnx_adapter").write_bytes(b"lora")
    calls = []

    def attach_adapters(lib, base_info, sources):
        calls.append((lib, base_info, sources))
        return {"adapters": [{"name": "my", "digest": "sha256:" + "1" * 64}]}

    module = types.ModuleType("ortserve.models.adapters")
    module.attach_adapters = attach_adapters
    monkeypatch.setitem(sys.modules, "ortserve.models.adapters", module)
    spec = parse_modelfile("FROM base\nADAPTER ./my.onnx_adapter\n", tmp_path)
    info = create_model(library, "adapted", spec)
    [(lib, base_info, sources)] = calls
    assert lib is library and base_info.digest == base.digest
    assert base_info.manifest["system"] == base.manifest["system"]
    assert sources == [("my.onnx_adapter", (tmp_path / "my.onnx_adapter").resolve())]
    assert info.manifest["adapters"] == [{"name": "my", "digest": "sha256:" + "1" * 64}]
