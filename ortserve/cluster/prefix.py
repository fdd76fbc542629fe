"""Ray Serve LLM's prefix-aware router, on the replicas that hold the request's model.

PrefixCacheAffinityRouter (Ray 2.60) asks Ray's multiplexing for the model's replicas twice
in one routing step: its power-of-two fallback asks first, and the second answer is then
"the replicas with the fewest models" (the multiplexing's next step for a request its
model's replicas turned down). Measured on 2 replicas and 2 models, each model was loaded
on both. Here the model's candidates are taken once, as the power-of-two router takes
them, and the prefix tree (Ray's) picks among them: the model's replicas first, the
conversation's replica among those; others only when they are full, as multiplexing does.

The prefix tree is a detached actor that outlives a redeploy, and a new router does not know
the replicas the old one served: the tree kept naming them, and routing failed with a
KeyError. Replicas the router does not have are dropped from the tree here.

Ray's router makes that actor wherever the scheduler likes, and calls it with no timeout: a
removed node that held it left every later request waiting on a dead actor. Here the tree
lives on the head node (the controller's; a cluster without it has no Serve either), takes
no CPU there (the head's CPUs may all be taken by replicas), and is restarted if it dies
anyway; while it is unreachable, routing goes on without it (power of two among the model's
replicas) instead of waiting.
"""

from __future__ import annotations

import logging
import random

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import (
    PrefixCacheAffinityRouter,
)
from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree import PrefixTreeActor
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

log = logging.getLogger("ortserve.cluster")

# Errors of a tree actor that is gone or not answering: routing carries on without it.
_TREE_DOWN = (RayActorError, GetTimeoutError)


class ModelPrefixRouter(PrefixCacheAffinityRouter):
    """PrefixCacheAffinityRouter whose candidates are multiplexing's, asked once."""

    def initialize_state(self, *, tree_actor=None, **kwargs) -> None:
        if tree_actor is None:
            tree_actor = _tree_actor_on_head(self._deployment_id)
        super().initialize_state(tree_actor=tree_actor, **kwargs)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if pending_request is None:
            return await super().choose_replicas(candidate_replicas, pending_request)
        if pending_request.metadata.multiplexed_model_id:
            ids = self.apply_multiplex_routing(pending_request=pending_request)
        else:
            ids = self.apply_locality_routing(pending_request=pending_request)
        candidates = [self._replicas[i] for i in ids if i in self._replicas]
        if not candidates:
            return []
        try:
            chosen = (await self._prefix_match_best_replicas(pending_request, candidates))[0]
        except KeyError:  # a replica the tree names is gone: forget it, choose without it
            self._tree_safely(self._forget_gone_replicas)
            chosen = []
        except _TREE_DOWN as exc:
            log.warning("prefix tree unavailable, routing without it: %s", exc)
            chosen = []
        # the tree's fallback (its smallest tenants) may name replicas outside the candidates
        kept = [replica for replica in chosen if replica.replica_id in ids]
        return [kept or random.sample(candidates, min(2, len(candidates)))]

    def update_replicas(self, replicas) -> None:
        self._tree_safely(lambda: super(ModelPrefixRouter, self).update_replicas(replicas))
        self._tree_safely(self._forget_gone_replicas)

    def on_replica_actor_died(self, replica_id) -> None:
        self._tree_safely(lambda: super(ModelPrefixRouter, self).on_replica_actor_died(replica_id))

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        self._tree_safely(
            lambda: super(ModelPrefixRouter, self).on_request_routed(
                pending_request, replica_id, result
            )
        )

    def _tree_safely(self, step) -> None:
        """Run a step that calls the tree; a tree that is down skips it (see the module)."""
        try:
            step()
        except _TREE_DOWN as exc:
            log.warning("prefix tree unavailable, skipped its update: %s", exc)

    def _forget_gone_replicas(self) -> None:
        """Drop from the tree the replicas this router does not have (see the module)."""
        known = {replica_id.to_full_id_str() for replica_id in self._replicas}
        tenants = ray.get(self._tree_actor.getattr.remote("tenant_to_char_count"), timeout=10)
        gone = [tenant for tenant in tenants if tenant not in known]
        if gone:
            ray.get(self._tree_actor.remove_tenants.remote(gone), timeout=10)


def _tree_actor_on_head(deployment_id):
    """The deployment's prefix tree, named as Ray's router names it, on the head node."""
    namespace = "::".join(
        part for part in (SERVE_NAMESPACE, deployment_id and deployment_id.app_name,
                          deployment_id and deployment_id.name) if part
    )  # fmt: skip
    actor = PrefixTreeActor.options(
        name="LlmPrefixTreeActor", namespace=namespace, get_if_exists=True, lifetime="detached",
        num_cpus=0, max_restarts=-1, max_task_retries=-1,
        scheduling_strategy=NodeAffinitySchedulingStrategy(_head_node_id(), soft=False),
    ).remote()  # fmt: skip
    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    ray.get(controller._register_shutdown_cleanup_actor.remote(actor))  # gone on serve.shutdown
    return actor


def _head_node_id() -> str:
    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return node["NodeID"]
    return ray.get_runtime_context().get_node_id()  # no head resource: this node
