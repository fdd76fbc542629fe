"""ortserve on Ray Serve, on a real 2-node Ray cluster on loopback: the official clients,
model-aware routing, a replica killed mid-stream, a node removed, readiness and autoscaling.

One cluster for the module (starting Ray costs ~10 s; its dashboard serves the state API the
tests list replicas with); each node has 1 CPU, and a replica
takes a node's CPU, so two nodes hold two replicas.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter

import httpx
import pytest

# Every node and the driver on 127.0.0.1 (set before Ray starts: the nodes inherit it), and
# the autoscaler's metrics pushed often enough for a test to see it act.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")

import anthropic  # noqa: E402
import ollama  # noqa: E402
import openai  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.serve.config import HTTPOptions  # noqa: E402
from ray.util.state import list_actors  # noqa: E402

from ortserve.cluster.deployments import APP_NAME, build, serve_tuning  # noqa: E402
from tests.integration.conftest import free_port  # noqa: E402

pytestmark = pytest.mark.slow

REPLICA = "x-ortserve-replica"


class Endpoint:
    def __init__(self, cluster: Cluster, url: str, models: str):
        self.cluster, self.url, self.models = cluster, url, models

    def deploy(self, autoscaling: dict | None = None, **env: str) -> None:
        """(Re)deploy the app; serve.run returns once its replicas are up."""
        args = {"ORTSERVE_MODELS": self.models, "ORTSERVE_KEEP_ALIVE": "-1", **env}
        serve.run(build({**args, "autoscaling": autoscaling}), name=APP_NAME, route_prefix="/")


@pytest.fixture(scope="module")
def endpoint(served_library):
    os.environ.update(serve_tuning())  # the nodes run as `ortserve serve --ray` starts them
    dashboard = {"include_dashboard": True, "dashboard_port": free_port()}  # not 8265: taken?
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, **dashboard})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, namespace="ortserve-tests", log_to_driver=False)
    os.environ["RAY_ADDRESS"] = cluster.address  # the state API's: other clusters may run
    port = free_port()
    serve.start(proxy_location="HeadOnly",
                http_options=HTTPOptions(host="127.0.0.1", port=port))  # fmt: skip
    try:
        yield Endpoint(cluster, f"http://127.0.0.1:{port}", str(served_library.root))
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop("RAY_ADDRESS", None)


def replicas() -> list:
    """The live Replica actors (each has a node)."""
    actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True)
    return [a for a in actors if (a.name or "").startswith(f"SERVE_REPLICA::{APP_NAME}#Replica#")]


def running_replicas() -> int:
    status = serve.status().applications[APP_NAME].deployments["Replica"]
    return status.replica_states.get("RUNNING", 0)


def wait_for(check, timeout: float, what: str) -> float:
    """Seconds until check() is true."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.2)
    return time.monotonic() - started


def generate(url: str, model: str, **extra) -> httpx.Response:
    body = {"model": model, "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
    return httpx.post(url + "/api/generate", json={**body, **extra}, timeout=120)


def test_requests_go_to_the_replica_that_holds_their_model(endpoint):
    """2 models, 2 replicas: each model is loaded once, and its requests stay with it."""
    endpoint.deploy(ORTSERVE_MIN_REPLICAS="2", ORTSERVE_MAX_REPLICAS="2")
    assert len({a.node_id for a in replicas()}) == 2  # one replica on each node
    served: dict[str, Counter] = {"tiny-chat": Counter(), "tiny-llama": Counter()}
    loads: Counter = Counter()
    for _ in range(6):
        for model in ("tiny-chat", "tiny-llama", "library/TINY-CHAT:latest"):
            response = generate(endpoint.url, model)
            assert response.status_code == 200, response.text
            key = "tiny-llama" if "llama" in model else "tiny-chat"
            served[key][response.headers[REPLICA]] += 1
            if response.json()["load_duration"] > 0:
                loads[(key, response.headers[REPLICA])] += 1
    print("loads per (model, replica):", dict(loads), "requests:", served)
    assert sorted(loads.values()) == [1, 1]  # each model loaded once in the whole cluster
    assert all(len(counts) == 1 for counts in served.values())  # and served where it is


def test_the_clients_chat_through_the_cluster_and_errors_keep_their_shapes(endpoint):
    client = openai.OpenAI(base_url=endpoint.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Hi!"}]
    answer = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=4)
    assert answer.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=messages,
                                                 max_tokens=4, stream=True))  # fmt: skip
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    reply = ollama.Client(host=endpoint.url).chat(model="tiny-chat", messages=messages,
                                                  options={"num_predict": 3})  # fmt: skip
    assert reply.message.role == "assistant" and reply.done
    claude_client = anthropic.Anthropic(base_url=endpoint.url, api_key="unused", max_retries=0)
    message = claude_client.messages.create(model="tiny-chat", max_tokens=4, messages=messages)
    assert message.role == "assistant" and message.stop_reason in ("max_tokens", "end_turn")
    with claude_client.messages.stream(model="tiny-chat", max_tokens=4,
                                       messages=messages) as stream:  # fmt: skip
        assert stream.get_final_message().usage.output_tokens > 0

    chat = {"model": "nope", "messages": messages}
    native = httpx.post(endpoint.url + "/api/chat", json=chat, timeout=30)
    assert native.status_code == 404 and set(native.json()) == {"error"}
    assert "nope" in native.json()["error"]
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=messages)
    assert caught.value.body["type"] == "not_found_error"
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude_client.messages.create(model="nope", max_tokens=4, messages=messages)
    assert missing.value.body["type"] == "error"
    bad = httpx.post(endpoint.url + "/v1/chat/completions", content=b"{not json", timeout=30)
    assert bad.status_code == 400 and "message" in bad.json()["error"]


def test_a_conversation_stays_on_the_replica_that_holds_its_prefix(endpoint):
    """tiny-chat on both replicas (preloaded): each conversation's second turn goes where
    its first turn ran, and reuses its KV cache there; conversations spread over both."""
    endpoint.deploy(ORTSERVE_MIN_REPLICAS="2", ORTSERVE_MAX_REPLICAS="2",
                    ORTSERVE_PRELOAD="tiny-chat")  # fmt: skip
    filler = " ".join(f"word{i % 50}" for i in range(150))  # ~730 tokens: the context is 1024
    homes, ratios, reused = set(), [], []
    for number in range(4):
        messages = [{"role": "user", "content": f"Conversation {number}. {filler}"}]
        first = chat_turn(endpoint.url, messages)
        messages += [{"role": "assistant", "content": first["text"]},
                     {"role": "user", "content": "And then?"}]  # fmt: skip
        second = chat_turn(endpoint.url, messages)
        assert second["replica"] == first["replica"], f"conversation {number} moved"
        homes.add(first["replica"])
        usage = second["usage"]
        reused.append(usage["prompt_tokens_details"]["cached_tokens"] / usage["prompt_tokens"])
        ratios.append(second["ttft"] / first["ttft"])
    print(
        f"affinity: turn 2 reused {min(reused):.2f}-{max(reused):.2f} of its prompt's KV; "
        f"TTFT turn 2 / turn 1: {', '.join(f'{r:.2f}' for r in ratios)} "
        f"(turn 1 {first['usage']['prompt_tokens']} tokens)"
    )
    assert min(reused) > 0.9
    assert len(homes) == 2  # new conversations go where the prefix tree holds least


def chat_turn(url: str, messages: list[dict]) -> dict:
    """One streamed OpenAI turn: its replica, time to first token, text and usage."""
    body = {"model": "tiny-chat", "messages": messages, "max_tokens": 4, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    started, ttft, text, usage = time.perf_counter(), None, "", None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as answer:
        assert answer.status_code == 200, answer.read()
        for line in answer.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and ttft is None:
                ttft = time.perf_counter() - started
            if chunk["choices"]:
                text += chunk["choices"][0]["delta"].get("content") or ""
            usage = chunk.get("usage") or usage
        replica = answer.headers[REPLICA]
    return {"replica": replica, "ttft": ttft, "text": text, "usage": usage}


def test_a_replica_killed_mid_stream_ends_the_stream_with_an_error_event(endpoint):
    body = {"model": "tiny-chat", "prompt": "tell me a story", "stream": True,
            "options": {"num_predict": 3000, "seed": 11}}  # fmt: skip
    lines = []
    with httpx.stream("POST", endpoint.url + "/api/generate", json=body, timeout=120) as stream:
        assert stream.status_code == 200
        replica_id = stream.headers[REPLICA]
        for line in stream.iter_lines():
            lines.append(json.loads(line))
            if len(lines) == 3:
                victim = next(a for a in replicas() if a.name.endswith(replica_id))
                ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)
                killed = time.monotonic()
    assert len(lines) > 3, lines  # the stream was cut, not finished early
    ended = time.monotonic() - killed
    assert "error" in lines[-1] and lines[-1]["error"].startswith("the replica serving")
    assert not lines[-1].get("done")
    print(f"stream ended {ended:.2f} s after the kill, {len(lines)} lines")
    for _ in range(4):  # the next requests are served (by the other replica, or a new one)
        assert generate(endpoint.url, "tiny-chat").status_code == 200
    wait_for(lambda: two_live_replicas(without=victim.name), 120, "the killed replica replaced")


def two_live_replicas(without: str | None = None) -> bool:
    """Two replicas running, both alive as actors: serve.status() still counts a killed
    replica as running until its controller notices, and it may then place the new one on a
    node added meanwhile."""
    live = [a.name for a in replicas()]
    return running_replicas() == 2 and len(live) == 2 and without not in live


def test_a_node_that_goes_away_has_its_replicas_replaced(endpoint):
    head = endpoint.cluster.head_node.node_id
    wait_for(two_live_replicas, 120, "two live replicas")
    tree = [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
            if a.name == "LlmPrefixTreeActor"]  # fmt: skip
    assert [a.node_id for a in tree] == [head], [(a.node_id, a.num_restarts) for a in tree]
    on_worker = {a.node_id for a in replicas()} - {head}
    worker = next(n for n in endpoint.cluster.worker_nodes if n.node_id in on_worker)
    spare = endpoint.cluster.add_node(num_cpus=1)
    endpoint.cluster.wait_for_nodes()
    endpoint.cluster.remove_node(worker)
    removed = time.monotonic()
    took = wait_for(lambda: running_replicas() == 2 and {a.node_id for a in replicas()}
                    == {head, spare.node_id}, 180, "replicas on the nodes left")  # fmt: skip
    print(f"replica replaced on the spare node {took:.1f} s after its node was removed")
    assert time.monotonic() - removed < 180
    assert generate(endpoint.url, "tiny-chat").status_code == 200


def test_ready_after_the_preload_and_scaled_with_the_queue(endpoint):
    """One replica when idle, two under load, one again after; each ready once its preload
    is in (/readyz through the cluster says so)."""
    endpoint.deploy(
        {"upscale_delay_s": 0.5, "downscale_delay_s": 3, "look_back_period_s": 1,
         "metrics_interval_s": 0.5},
        ORTSERVE_MIN_REPLICAS="1", ORTSERVE_MAX_REPLICAS="2", ORTSERVE_NUM_PARALLEL="1",
        ORTSERVE_PRELOAD="tiny-chat",
    )  # fmt: skip
    ready = httpx.get(endpoint.url + "/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["models"] == {"tiny-chat": "loaded"}
    assert running_replicas() == 1

    stop = threading.Event()

    def stream_until_stopped():
        body = {"model": "tiny-chat", "prompt": "go", "options": {"num_predict": 3000}}
        while not stop.is_set():
            with httpx.stream("POST", endpoint.url + "/api/generate", json=body,
                              timeout=120) as answer:  # fmt: skip
                for _ in answer.iter_lines():
                    if stop.is_set():
                        break

    threads = [threading.Thread(target=stream_until_stopped, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        up = wait_for(lambda: running_replicas() == 2, 120, "a second replica under load")
        for _ in range(4):  # every replica that answers says it is ready, its model loaded
            assert httpx.get(endpoint.url + "/readyz", timeout=30).json()["status"] == "ready"
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    down = wait_for(lambda: running_replicas() == 1, 120, "back to one replica when idle")
    print(f"autoscaling: 1 -> 2 replicas {up:.1f} s into the load, 2 -> 1 {down:.1f} s after it")
