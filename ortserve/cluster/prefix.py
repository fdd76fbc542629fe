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
"""

from __future__ import annotations

import random

import ray
from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import (
    PrefixCacheAffinityRouter,
)


class ModelPrefixRouter(PrefixCacheAffinityRouter):
    """PrefixCacheAffinityRouter whose candidates are multiplexing's, asked once."""

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
            self._forget_gone_replicas()
            chosen = []
        # the tree's fallback (its smallest tenants) may name replicas outside the candidates
        kept = [replica for replica in chosen if replica.replica_id in ids]
        return [kept or random.sample(candidates, min(2, len(candidates)))]

    def update_replicas(self, replicas) -> None:
        super().update_replicas(replicas)
        self._forget_gone_replicas()

    def _forget_gone_replicas(self) -> None:
        """Drop from the tree the replicas this router does not have (see the module)."""
        known = {replica_id.to_full_id_str() for replica_id in self._replicas}
        tenants = ray.get(self._tree_actor.getattr.remote("tenant_to_char_count"))
        gone = [tenant for tenant in tenants if tenant not in known]
        if gone:
            ray.get(self._tree_actor.remove_tenants.remote(gone))
