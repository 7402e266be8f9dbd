"""The Ray Serve request router of the engine replicas: to the replica holding the paused
context, else the one holding the prefix, else the least loaded.

Ray Serve runs one router per deployment handle, in the process that owns the handle (for the
OpenAI endpoint: the ingress replica). This router reads the ``RoutedRequest`` a call carries
(``pending_request.args[0]``) and the :class:`~infercept.deploy.affinity.AffinityTable` of its
process, which the ingress fills from replies (``affinity.affinity_table``). When Ray Serve
reports a replica set (``update_replicas``, after a start, a restart or a death) or a replica
dying (``on_replica_actor_died``), the entries of the replicas that are gone are dropped;
with each replica set come the keys each replica reports holding (its routing stats, every
2 s), so a router that starts empty (an ingress restart) rebuilds its table from them.

Choices, in order (each a Ray Serve "rank"; the base class probes queue lengths and backs
off while a rank's replicas are full):

1. ``pin`` names a replica: that one only (``/replicas/{id}/...``).
2. a context key (session, tool call, response) names a live replica: that one only. Waiting
   for a busy replica costs less than prefilling the whole conversation elsewhere.
3. a known prefix: the replica that served it, unless its queue is longer than the shortest
   by more than ``imbalanced_threshold``; then, and otherwise, power of two choices.
"""

from __future__ import annotations

from typing import Any

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import (LocalityMixin, MultiplexMixin, PendingRequest,
                                      ReplicaID, RequestRouter, RunningReplica)

# Ray Serve pickles this module by value into each handle's process, so module state here
# would be a copy per router: the table lives in affinity.py, imported by reference.
from infercept.deploy.affinity import affinity_table
from infercept.deploy.messages import RoutedRequest


def _routed(pending_request: PendingRequest | None) -> RoutedRequest | None:
    if pending_request is None or not pending_request.args:
        return None
    first = pending_request.args[0]
    return first if isinstance(first, RoutedRequest) else None


class InterceptAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Routes a follow-up to the replica holding its paused context (see the module doc)."""

    def initialize_state(self, imbalanced_threshold: int = 4, **kwargs: Any) -> None:
        """Args: imbalanced_threshold: how many more queued requests than the least loaded
        replica the prefix's replica may have and still be chosen for it."""
        self.imbalanced_threshold = imbalanced_threshold
        self.table = affinity_table(self._deployment_id.app_name, self._deployment_id.name)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        routed = _routed(pending_request)
        by_name = {r.replica_id.unique_id: r for r in candidate_replicas}
        if routed is not None:
            wanted = routed.pin or self.table.owner(routed.context_keys)
            if wanted is not None and (replica := by_name.get(wanted)) is not None:
                assert pending_request is not None
                pending_request.routing_context.should_backoff = True
                return [[replica]]
            if routed.pin is not None:  # that replica is gone: nowhere else will do
                pending_request.routing_context.should_backoff = True
                return []
        by_load = await PowerOfTwoChoicesRequestRouter.choose_replicas(
            self, candidate_replicas=candidate_replicas, pending_request=pending_request)
        if routed is None or not routed.prefix_hashes:
            return by_load
        owner, _ = self.table.prefix_owner(routed.prefix_hashes)
        replica = by_name.get(owner) if owner is not None else None
        if replica is None or not self._is_balanced(replica, candidate_replicas):
            return by_load
        return [[replica], *by_load]

    def _is_balanced(self, replica: RunningReplica, replicas: list[RunningReplica]) -> bool:
        """Whether ``replica``'s cached queue length is within ``imbalanced_threshold`` of
        the shortest (unknown lengths count as balanced: the probe decides)."""
        cache = self._replica_queue_len_cache
        mine = cache.get(replica.replica_id)
        known = [n for r in replicas if (n := cache.get(r.replica_id)) is not None]
        return mine is None or not known or mine - min(known) <= self.imbalanced_threshold

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """A new replica set, or new routing stats: drop the replicas that are gone, learn
        the keys each live one reports holding (``EngineReplica.record_routing_stats``)."""
        super().update_replicas(replicas)
        self.table.retain(r.replica_id.unique_id for r in replicas)
        for replica in replicas:
            keys = (replica.routing_stats or {}).get("keys")
            if isinstance(keys, list):
                self.table.learn(replica.replica_id.unique_id, keys)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.table.forget(replica_id.unique_id)
