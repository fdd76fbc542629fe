"""The built wheel and sdist: complete, installable into a fresh environment, and resolvable
to exactly one onnxruntime-genai flavour on every platform."""

from __future__ import annotations

import email
import json
import os
import subprocess
import sys
import tarfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement

from tests.support.http import free_port

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ortserve", "converters")
FLAVOURS = {
    "onnxruntime-genai",
    "onnxruntime-genai-cuda",
    "onnxruntime-genai-winml",
    "onnxruntime-genai-directml",
}
# packaging.markers environments of the platforms pip would install on
PLATFORMS = {
    "windows-x64": {"platform_system": "Windows", "sys_platform": "win32", "os_name": "nt",
                    "platform_machine": "AMD64"},
    "macos-arm64": {"platform_system": "Darwin", "sys_platform": "darwin", "os_name": "posix",
                    "platform_machine": "arm64"},
    "linux-x64": {"platform_system": "Linux", "sys_platform": "linux", "os_name": "posix",
                  "platform_machine": "x86_64"},
}  # fmt: skip


@pytest.fixture(scope="session")
def dist(tmp_path_factory) -> Path:
    """The wheel and sdist built from the repository's tracked files (as a clean clone has)."""
    source = tmp_path_factory.mktemp("source")
    tracked = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--wheel", "--sdist", "--outdir",
         str(out), str(source)],
        check=True, capture_output=True,
    )  # fmt: skip
    return out


def _wheel(dist: Path) -> Path:
    return next(dist.glob("ortserve-*.whl"))


def _source_files() -> set[str]:
    """Every module and data file the packages have in the checkout."""
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                found.add(path.relative_to(ROOT).as_posix())
    return found


def _requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(archive.read(name))
    return [Requirement(line) for line in metadata.get_all("Requires-Dist")]


def _resolved(requirements, platform: str, extras: tuple[str, ...] = ("",)) -> list[str]:
    """Requirement names whose markers hold on `platform` with `extras` asked for."""
    names = []
    for requirement in requirements:
        marker = requirement.marker
        environment = {**PLATFORMS[platform], "python_version": "3.11",
                       "python_full_version": "3.11.9", "implementation_name": "cpython"}  # fmt: skip
        if marker is None or any(
            Marker(str(marker)).evaluate({**environment, "extra": extra}) for extra in extras
        ):
            names.append(requirement.name.lower())
    return names


def test_the_wheel_holds_every_module_schema_and_data_file(dist):
    with zipfile.ZipFile(_wheel(dist)) as archive:
        files = {n for n in archive.namelist() if n.split("/")[0] in PACKAGES}
    expected = _source_files()
    assert expected - files == set(), "missing from the wheel"
    assert files - expected == set(), "in the wheel but not in the source tree"
    assert "ortserve/engine/scheduler.py" in files and "converters/data/corpus.txt" in files
    assert "converters/data/demo-chat/model.safetensors" in files  # `make demo` needs no training
    assert any(n.startswith("ortserve/api/schemas/") and n.endswith(".json") for n in files)


def test_the_sdist_holds_every_module_schema_and_data_file(dist):
    sdist = next(dist.glob("ortserve-*.tar.gz"))
    with tarfile.open(sdist) as archive:
        files = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    assert _source_files() - files == set()
    assert {"setup.cfg", "pyproject.toml", "README.md"} <= files


def test_the_wheel_needs_python_311(dist):
    # onnxruntime-genai 0.18 publishes no cp310 wheels
    with zipfile.ZipFile(_wheel(dist)) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        assert email.message_from_bytes(archive.read(name))["Requires-Python"] == ">=3.11"


@pytest.mark.parametrize(
    ("platform", "flavour"),
    [("windows-x64", "onnxruntime-genai-winml"), ("macos-arm64", "onnxruntime-genai"),
     ("linux-x64", "onnxruntime-genai")],
)  # fmt: skip
def test_each_platform_resolves_to_exactly_one_genai_flavour(dist, platform, flavour):
    requirements = _requirements(_wheel(dist))
    for extras in [("",), ("", "webgpu"), ("", "openvino"), ("", "windowsml")]:
        chosen = FLAVOURS & set(_resolved(requirements, platform, extras))
        assert chosen == {flavour}, (platform, extras)
    server = "waitress" if platform == "windows-x64" else "gunicorn"
    assert server in _resolved(requirements, platform)


def test_the_cuda_extra_adds_the_cuda_flavour_that_the_start_up_check_resolves(dist):
    # An extra cannot remove a base requirement: [cuda] installs two flavours, and ortserve
    # refuses to start until one is left (test_a_cuda_install_... runs that for real).
    chosen = FLAVOURS & set(_resolved(_requirements(_wheel(dist)), "linux-x64", ("", "cuda")))
    assert chosen == {"onnxruntime-genai", "onnxruntime-genai-cuda"}


@pytest.mark.parametrize(
    ("platform", "tag"), [("windows-x64", "win_amd64"), ("macos-arm64", "macosx_14_0_arm64")]
)
def test_pip_resolves_the_wheels_requirements_for_windows_and_macos(dist, tmp_path, platform, tag):
    """pip's resolver, with wheel tags for that platform, on the marker-evaluated requirements."""
    requirements = [
        str(r.specifier and f"{r.name}{r.specifier}" or r.name)
        for r in _requirements(_wheel(dist))
        if r.marker is None or Marker(str(r.marker)).evaluate({**PLATFORMS[platform], "extra": ""})
    ]
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--only-binary=:all:", "--platform", tag, "--python-version", "3.11",
         "--target", str(tmp_path / "target"), "--report", str(report), *requirements],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    installed = {
        item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]
    }
    flavours = FLAVOURS & installed
    assert flavours == {
        "onnxruntime-genai-winml" if platform == "windows-x64" else "onnxruntime-genai"
    }


# ---- a fresh virtual environment, from the built wheel ----------------------------------------


def _fresh_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path / ("Scripts" if os.name == "nt" else "bin")


def _pip(bin_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True, text=True,
    )  # fmt: skip


def _serve(bin_dir: Path, library, cwd: Path, **env: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("ORTSERVE_", "PYTHON"))},
        "ORTSERVE_MODELS": str(library.root),
        "ORTSERVE_HOST": f"127.0.0.1:{port}",
        **env,
    }
    process = subprocess.Popen(
        [str(bin_dir / "ortserve"), "serve"], cwd=cwd, env=environment,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    return process, f"http://127.0.0.1:{port}"


def _wait(process: subprocess.Popen, url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {process.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "/", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("server did not start")


def _chat(url: str) -> dict:
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}],
            "stream": False, "options": {"num_predict": 8, "temperature": 0}}  # fmt: skip
    request = urllib.request.Request(url + "/api/chat", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def test_the_built_wheel_serves_from_a_fresh_environment(dist, tmp_path, served_library):
    bin_dir = _fresh_venv(tmp_path / "venv")
    installed = _pip(bin_dir, "install", "--quiet", str(_wheel(dist)))
    assert installed.returncode == 0, installed.stderr
    where = subprocess.run(
        [str(bin_dir / "python"), "-c", "import ortserve.engine.scheduler as m; print(m.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert str(tmp_path / "venv") in where  # the installed copy, not the checkout
    process, url = _serve(bin_dir, served_library, tmp_path)
    try:
        _wait(process, url)
        answer = _chat(url)
        assert answer["done"] and answer["eval_count"] == 8 and answer["message"]["content"]
    finally:
        _stop(process)
    doctor = subprocess.run([str(bin_dir / "ortserve"), "doctor"], cwd=tmp_path,
                            capture_output=True, text=True)  # fmt: skip
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr


def test_a_cuda_install_without_a_gpu_names_the_fix_then_falls_back_to_cpu(
    dist, tmp_path, served_library
):
    bin_dir = _fresh_venv(tmp_path / "venv")
    installed = _pip(bin_dir, "install", "--quiet", f"{_wheel(dist)}[cuda]")
    assert installed.returncode == 0, installed.stderr
    # two flavours share one module: start-up stops with one line naming the pip commands
    process, url = _serve(bin_dir, served_library, tmp_path)
    output, _ = process.communicate(timeout=60)
    assert process.returncode != 0
    error = output.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("Error: 2 onnxruntime-genai flavours"), output
    fix = error[0].split("Keep one: ", 1)[1]
    assert fix == ('pip uninstall -y onnxruntime-genai onnxruntime-genai-cuda && '
                   'pip install "onnxruntime-genai-cuda==0.18.*"')  # fmt: skip
    uninstall, install = fix.split(" && ")
    assert _pip(bin_dir, *uninstall.split()[1:]).returncode == 0
    assert _pip(bin_dir, "install", "--quiet", "onnxruntime-genai-cuda==0.18.*").returncode == 0
    # the cuda flavour with no GPU: auto runs on the CPU, and says why CUDA is not used
    process, url = _serve(bin_dir, served_library, tmp_path)
    try:
        _wait(process, url)
        assert _chat(url)["eval_count"] == 8
        with urllib.request.urlopen(url + "/api/ps") as response:
            assert json.loads(response.read())["models"][0]["provider"] == "cpu"
    finally:
        _stop(process)
    doctor = subprocess.run([str(bin_dir / "ortserve"), "doctor"], cwd=tmp_path,
                            capture_output=True, text=True)  # fmt: skip
    assert "no NVIDIA GPU or driver found" in doctor.stdout, doctor.stdout
