"""`ortserve batch --ray`: batch lines spread over a Ray cluster's nodes (docs/batch.md).

One actor per node, each holding the app `ortserve serve` runs (and so its loaded models), runs
lines as the local run does (api/batchexec.py). The driver keeps ORTSERVE_NUM_PARALLEL lines in
flight on each actor, the next line going to the actor with the fewest, so a node's engine
batches them and a faster node takes more; each record comes back to the driver, which writes
it (ortserve/batch.py) as the local run does: the two give the same output.

Ray restarts an actor whose worker died and retries its lines once (max_restarts,
max_task_retries); a line that fails even so is recorded as that line's server_error.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ortserve.config import Settings
from ortserve.errors import OrtServeError
from ortserve.serving.batchlines import BatchLine


class LineActor:
    """The app on one node; runs lines concurrently (a threaded actor)."""

    def __init__(self, models: list[str]):
        from ortserve.api import create_app
        from ortserve.api.batchexec import LineExecutor

        settings = Settings.from_env()  # the driver's ORTSERVE_* (runtime_env)
        settings.models.mkdir(parents=True, exist_ok=True)
        self.app = create_app(settings)
        self.execute = LineExecutor(self.app, background=False)  # no interactive turns here
        if len(models) <= settings.max_loaded_models:
            self.execute.preload(models)
        self.node_id = ray.get_runtime_context().get_node_id()

    def node(self) -> str:
        """Where it runs (and, as a call, that the models are loaded)."""
        return self.node_id

    def run(self, line: BatchLine) -> tuple[dict[str, Any], str]:
        return self.execute(line), self.node_id


class RayRunner:
    """Runs lines on one LineActor per alive node with a CPU; counts the lines each node ran."""

    def __init__(self, address: str | None, settings: Settings, models: list[str]):
        from ortserve.cluster.deployments import replica_env

        if not ray.is_initialized():
            ray.init(address=address, namespace="ortserve-batch", log_to_driver=False)
        env = {**replica_env(), "ORTSERVE_MODELS": str(settings.models.resolve())}
        options = {"num_cpus": 1, "max_concurrency": settings.num_parallel, "max_restarts": 1,
                   "max_task_retries": 1, "runtime_env": {"env_vars": env}}  # fmt: skip
        actor = ray.remote(LineActor)
        # one per node (soft: a restarted actor may go to another node if its own is gone)
        places = [NodeAffinitySchedulingStrategy(node, soft=True) for node in _nodes()]
        self.actors = [actor.options(**options, scheduling_strategy=place).remote(models)
                       for place in places]  # fmt: skip
        ray.get([a.node.remote() for a in self.actors])  # every model loaded before the clock
        self.concurrency = settings.num_parallel * len(self.actors)
        self.nodes: Counter[str] = Counter()
        self._in_flight = [0] * len(self.actors)
        self._lock = threading.Lock()

    def __call__(self, line: BatchLine) -> dict[str, Any]:
        with self._lock:  # the actor with the fewest lines in flight
            index = min(range(len(self.actors)), key=self._in_flight.__getitem__)
            self._in_flight[index] += 1
        try:
            record, node = ray.get(self.actors[index].run.remote(line))
        finally:
            with self._lock:
                self._in_flight[index] -= 1
        with self._lock:
            self.nodes[node] += 1
        return record

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        ray.shutdown()


def _nodes() -> list[str]:
    """The alive nodes that can hold an actor (one CPU)."""
    nodes = [n["NodeID"] for n in ray.nodes()
             if n["Alive"] and n.get("Resources", {}).get("CPU", 0) >= 1]  # fmt: skip
    if not nodes:
        raise OrtServeError("the Ray cluster has no alive node with a CPU to run lines on")
    return nodes
