"""Answers the cluster's Router assembles from every replica: `/api/ps` and `/metrics`.

Each replica's app answers for its own process (the models it holds, its counters). Through
the cluster these two are the cluster's: the Router sends the request to every running
replica (Ray Serve's DeploymentHandle.broadcast), each app answers it as it would any request
(its keys and guards included), and the answers are merged here. Every other endpoint reads
the library every replica shares, so any one replica's answer is the cluster's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

# The label each merged sample (and the field each /api/ps entry) gets: its replica's id.
REPLICA_LABEL = "replica"


@dataclass(frozen=True)
class Answer:
    """One replica's whole answer to a request."""

    replica: str
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def merge_ps(answers: Iterable[Answer]) -> bytes:
    """Every replica's loaded models in one /api/ps list, each entry naming its replica (a
    model loaded on two replicas is listed twice: each copy has its own memory and expiry)."""
    models = [{**model, REPLICA_LABEL: answer.replica}
              for answer in answers for model in json.loads(answer.body)["models"]]  # fmt: skip
    return json.dumps({"models": models}).encode()


def merge_metrics(answers: Iterable[Answer]) -> bytes:
    """Every replica's Prometheus text as one exposition: each family once (its HELP and
    TYPE from the first replica that has it), each sample labelled with its replica."""
    families: dict[str, Metric] = {}
    for answer in answers:
        for family in text_string_to_metric_families(answer.body.decode()):
            samples = [sample._replace(labels={**sample.labels, REPLICA_LABEL: answer.replica})
                       for sample in family.samples]  # fmt: skip
            merged = families.setdefault(family.name, family)
            merged.samples = [*merged.samples, *samples] if merged is not family else samples
    return generate_latest(_Families(list(families.values())))


class _Families:
    """What generate_latest reads from a registry: its metric families."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


# GET paths the Router gathers from every replica, and how their bodies merge.
GATHERED: dict[str, Callable[[list[Answer]], bytes]] = {
    "/api/ps": merge_ps,
    "/metrics": merge_metrics,
}
