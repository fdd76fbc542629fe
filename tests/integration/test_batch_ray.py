"""Batch conversion on a real 2-node Ray cluster on loopback: entries as Ray tasks writing into
one shared library, a failure kept to its entry, a killed worker's entry retried once, and the
CLI's `--ray` with a push to the suite's local hub.

One cluster for the module (starting Ray costs ~10 s); each node has 1 CPU and a task takes
one, so two entries run at once, one per node.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

# Every node and the driver on 127.0.0.1 (set before Ray starts: the nodes inherit it).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from converters import batch  # noqa: E402
from ortserve.library import Library  # noqa: E402
from tests.hub import LocalHub  # noqa: E402

pytestmark = pytest.mark.slow
TOKEN = "hf_test_write_token"


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})  # fmt: skip
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, namespace="ortserve-tests", log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Library:
    """The library every node writes into (one disk here, a shared one on a real cluster)."""
    return Library(tmp_path_factory.mktemp("shared") / "models")


def node_ids() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def test_entries_run_as_tasks_on_both_nodes_and_a_failure_stays_alone(
    cluster, shared, tiny_checkpoint, tmp_path, capsys
):
    (tmp_path / "empty").mkdir()  # no config.json: fails in its task, alone
    spec = [
        {"source": str(tiny_checkpoint("llama")), "name": "ray-llama", "verify": False},
        {"source": str(tiny_checkpoint("qwen2")), "name": "ray-qwen", "precision": "fp32",
         "verify": False},
        {"source": str(tmp_path / "empty"), "name": "ray-empty"},
    ]  # fmt: skip
    report = batch.run(spec, library=shared, ray_address=cluster.address,
                       report=tmp_path / "report.json")  # fmt: skip
    progress = capsys.readouterr().err
    with capsys.disabled():
        print(f"\n{report.table()}\nper node: {report.nodes()}")

    llama, qwen, empty = report.entries
    assert [e.status for e in report.entries] == ["converted", "converted", "failed"]
    assert "has no config.json" in empty.error
    assert {m.name for m in shared.list()} == {"ray-llama:latest", "ray-qwen:latest"}
    for entry in (llama, qwen):
        model = shared.get(entry.name)
        assert entry.digest == model.digest and entry.size == model.size
        assert shared.verify(entry.name)[0].ok
    assert qwen and shared.get("ray-qwen").details["quantization"] == "fp32"
    # every entry says where it ran, and the two nodes shared the work
    assert {e.node for e in report.entries} <= node_ids()
    assert set(report.nodes()) == node_ids() and len(node_ids()) == 2
    assert "NODE" in report.table() and llama.node[:12] in report.table()
    # each task declared the local scheduler's estimate as its memory need
    peak = batch.probe(batch.BatchEntry(spec[0]["source"], "ray-llama")).peak
    assert peak > 0 and f"~{batch.humanize.size(peak)} memory" in progress
    written = (tmp_path / "report.json").read_text()
    assert llama.node in written


def _kill_workers(limits: dict[str, int], stop: threading.Event, killed: list) -> None:
    """SIGKILL the Ray worker converting entry NAME (titled `ray::convert NAME`) up to
    limits[NAME] times: only this test's own cluster processes, by pid."""
    me = psutil.Process()
    done: set[int] = set()
    while not stop.is_set():
        for process in me.children(recursive=True):
            try:
                title = " ".join(process.cmdline())
            except psutil.Error:
                continue
            for name, limit in limits.items():
                mine = title.startswith(f"ray::convert {name}")
                if mine and process.pid not in done and killed.count(name) < limit:
                    time.sleep(0.5)  # let it start converting
                    process.send_signal(signal.SIGKILL)
                    done.add(process.pid)
                    killed.append(name)
        time.sleep(0.05)


def test_a_killed_worker_is_retried_once_then_reported(cluster, shared, tiny_checkpoint):
    spec = [
        {"source": str(tiny_checkpoint("llama")), "name": "once", "verify": False},
        {"source": str(tiny_checkpoint("llama")), "name": "twice", "verify": False},
    ]
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_workers,
                              args=({"once:latest": 1, "twice:latest": 2}, stop, killed))  # fmt: skip
    killer.start()
    try:
        report = batch.run(spec, library=shared, ray_address=cluster.address, progress=False)
    finally:
        stop.set()
        killer.join()
    print(report.table())
    assert sorted(killed) == ["once:latest", "twice:latest", "twice:latest"]
    once, twice = report.entries
    assert once.status == "converted" and shared.verify("once")[0].ok
    assert twice.status == "failed" and "its Ray worker died, also when retried" in twice.error
    assert not any(m.name == "twice:latest" for m in shared.list())


def test_the_cli_converts_on_ray_and_pushes(cluster, shared, tiny_checkpoint, tmp_path):
    hub = LocalHub().start()
    hub.write_token = TOKEN
    try:
        spec = tmp_path / "spec.yaml"
        spec.write_text(
            "defaults: {verify: false}\nmodels:\n"
            f"  - {{source: {tiny_checkpoint('qwen2')}, name: cli-qwen,"
            " push: hf.co/test/cli-qwen:cpu-int4}\n"
        )
        env = {**os.environ, "ORTSERVE_MODELS": str(shared.root), "HF_ENDPOINT": hub.url,
               "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf-home"),
               "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "ortserve", "convert", "--batch", str(spec),
             "--ray", cluster.address],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        print(result.stdout, f"CLI run: {time.perf_counter() - started:.1f}s")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "NODE" in result.stdout and "pushed to hf.co/test/cli-qwen:cpu-int4" in result.stdout
        assert "entries per node: " in result.stdout
        assert shared.verify("cli-qwen")[0].ok
        assert [repo for repo, _ in hub.commits] == ["test/cli-qwen"]

        # locally (no --ray) the same field pushes too: a refused push fails its entry...
        local = [sys.executable, "-m", "ortserve", "convert", "--batch", str(spec)]
        refused = subprocess.run(local, env={**env, "HF_TOKEN": ""}, capture_output=True,
                                 text=True, timeout=120)  # fmt: skip
        assert refused.returncode == 1, refused.stderr[-3000:]
        assert (
            "in the library, but the push to hf.co/test/cli-qwen:cpu-int4 failed"
            in (refused.stdout)
            and "HTTP 401" in refused.stdout
        )
        # ...and a re-run finds the model up to date and the hub too: nothing new committed
        again = subprocess.run(local, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "skipped" in again.stdout and "pushed to hf.co/test/cli-qwen" in again.stdout
        assert len(hub.commits) == 1
    finally:
        hub.stop()
