"""What one replica alone would not know, through a real 2-node Ray cluster on loopback:
stored Responses answers read and continued on another replica, /api/ps and /metrics for
every replica, keys still required; and a client that hangs up mid-stream stops its turn.

Its own cluster (test_cluster.py redeploys its app as it goes): one deployment of 2 replicas,
one a node, tiny-chat preloaded on both, an API key required.
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node and the driver on 127.0.0.1

import openai  # noqa: E402
import ray  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.serve.config import HTTPOptions  # noqa: E402

from ortserve.cluster.deployments import APP_NAME, build, serve_tuning  # noqa: E402
from tests.integration.conftest import free_port  # noqa: E402

pytestmark = pytest.mark.slow

REPLICA = "x-ortserve-replica"
KEY = "cluster-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Endpoint:
    def __init__(self, url: str, port: int):
        self.url, self.port = url, port

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, headers=kwargs.pop("headers", AUTH), timeout=60,
                         **kwargs)  # fmt: skip

    def on_every_replica(self, method: str, path: str, body: dict | None = None) -> list:
        """The request run by every replica's app (as the Router gathers /api/ps): each
        replica's Answer, whichever replica made what it reads."""
        raw = json.dumps(body).encode() if body is not None else b""
        headers = [(b"host", f"127.0.0.1:{self.port}".encode()), (b"content-type",
                   b"application/json"), (b"content-length", str(len(raw)).encode()),
                   *[(k.lower().encode(), v.encode()) for k, v in AUTH.items()]]  # fmt: skip
        scope = {"type": "http", "http_version": "1.1", "method": method, "scheme": "http",
                 "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
                 "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", self.port),
                 "headers": headers}  # fmt: skip
        handle = serve.get_deployment_handle("Replica", APP_NAME)
        answers = handle.broadcast("answer", scope, raw).results(timeout_s=120)
        assert len(answers) == 2, answers
        return answers


@pytest.fixture(scope="module")
def endpoint(served_library):
    os.environ.update(serve_tuning())
    dashboard = {"include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, **dashboard})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, namespace="ortserve-tests", log_to_driver=False)
    port = free_port()
    serve.start(proxy_location="HeadOnly",
                http_options=HTTPOptions(host="127.0.0.1", port=port))  # fmt: skip
    args = {"ORTSERVE_MODELS": str(served_library.root), "ORTSERVE_KEEP_ALIVE": "-1",
            "ORTSERVE_MIN_REPLICAS": "2", "ORTSERVE_MAX_REPLICAS": "2",
            "ORTSERVE_PRELOAD": "tiny-chat", "ORTSERVE_API_KEYS": f"tests:{KEY}"}  # fmt: skip
    try:
        serve.run(build(args), name=APP_NAME, route_prefix="/")
        yield Endpoint(f"http://127.0.0.1:{port}", port)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def test_a_stored_response_is_read_and_continued_on_every_replica(endpoint):
    client = openai.OpenAI(base_url=endpoint.url + "/v1", api_key=KEY, max_retries=0)
    first = client.responses.with_raw_response.create(model="tiny-chat", input="Hi",
                                                      max_output_tokens=4)  # fmt: skip
    made_on, first = first.headers[REPLICA], first.parse()
    # A GET and a next turn on each replica: one of them is not the one that made it.
    gets = endpoint.on_every_replica("GET", f"/v1/responses/{first.id}")
    assert {a.replica for a in gets} - {made_on}, "both answers came from one replica"
    for got in gets:
        assert got.status == 200, got.body
        assert json.loads(got.body)["id"] == first.id
    turn = {"model": "tiny-chat", "input": "And?", "previous_response_id": first.id,
            "max_output_tokens": 4}  # fmt: skip
    for second in endpoint.on_every_replica("POST", "/v1/responses", turn):
        assert second.status == 200, second.body
        assert json.loads(second.body)["previous_response_id"] == first.id
    # through the endpoint, wherever it is routed
    third = client.responses.create(model="tiny-chat", input="More?", max_output_tokens=4,
                                    previous_response_id=first.id)  # fmt: skip
    assert client.responses.retrieve(third.id).previous_response_id == first.id
    client.responses.delete(first.id)
    for gone in endpoint.on_every_replica("GET", f"/v1/responses/{first.id}"):
        assert gone.status == 404, gone.body


def test_ps_lists_the_models_of_every_replica(endpoint):
    ps = endpoint.get("/api/ps")
    assert ps.status_code == 200, ps.text
    models = ps.json()["models"]
    # tiny-chat is preloaded on both replicas: listed once for each, naming it
    assert sorted(m["name"] for m in models) == ["tiny-chat:latest"] * 2
    replicas = {m["replica"] for m in models}
    assert len(replicas) == 2 and set(ps.headers[REPLICA].split(",")) == replicas
    refused = endpoint.get("/api/ps", headers={})  # the app's key check, as ever
    assert refused.status_code == 401 and "error" in refused.json()


def test_metrics_carry_every_replicas_samples(endpoint):
    metrics = endpoint.get("/metrics")
    assert metrics.status_code == 200, metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
    loaded = {s.labels["replica"]: s.value for s in families["ortserve_loaded_models"].samples}
    assert len(loaded) == 2 and set(loaded.values()) == {1.0}
    assert metrics.text.count("# TYPE ortserve_pending_turns gauge") == 1
    assert endpoint.get("/metrics", headers={}).status_code == 401


def pending_turns(endpoint: Endpoint) -> float:
    """Turns queued or generating on all replicas, from the cluster's /metrics."""
    text = endpoint.get("/metrics").text
    family = next(f for f in text_string_to_metric_families(text)
                  if f.name == "ortserve_pending_turns")  # fmt: skip
    return sum(sample.value for sample in family.samples)


def generated_tokens(endpoint: Endpoint) -> float:
    text = endpoint.get("/metrics").text
    family = next(f for f in text_string_to_metric_families(text) if f.name == "ortserve_tokens")
    return sum(s.value for s in family.samples
               if s.name.endswith("_total") and s.labels["kind"] == "generated")  # fmt: skip


def test_a_client_that_hangs_up_mid_stream_stops_its_turn(endpoint):
    before = generated_tokens(endpoint)
    body = {"model": "tiny-chat", "prompt": "tell me a story", "stream": True,
            "options": {"num_predict": 3000, "seed": 11}}  # fmt: skip
    lines = 0
    with httpx.stream("POST", endpoint.url + "/api/generate", json=body, headers=AUTH,
                      timeout=120) as stream:  # fmt: skip
        assert stream.status_code == 200
        for line in stream.iter_lines():
            assert not json.loads(line).get("done"), "the turn ended before the hang-up"
            lines += 1
            if lines == 5:
                assert pending_turns(endpoint) == 1  # the turn is running, and counted
                break
    closed = time.monotonic()  # leaving the block closes the connection
    while pending_turns(endpoint) > 0:
        assert time.monotonic() - closed < 10, "the turn still runs 10 s after the hang-up"
        time.sleep(0.2)
    stopped = time.monotonic() - closed
    made = generated_tokens(endpoint) - before
    print(f"hang-up: turn gone {stopped:.2f} s after the client closed, {made:.0f} tokens made")
    # cut short: run to its end, the turn makes ~1000 tokens (tiny-chat's context is 1024)
    assert made < 500
