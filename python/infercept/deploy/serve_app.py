"""The Ray Serve application: an ingress behind Ray's HTTP proxy, N engine replicas behind
the ingress's handle (routed by :class:`InterceptAffinityRouter`), and one actor mirroring the
stored responses.

HTTP request -> Ray's proxy -> :class:`Ingress` (parses the body once for the routing keys)
-> ``EngineReplica.forward`` on the replica the router picks -> the OpenAI server app, in
process (:class:`~infercept.deploy.replica.ReplicaServer`) -> the reply streams back the same
way, the keys it hands out learned by the ingress before its last chunk.

Why an ingress and not Ray's proxy calling the replicas directly: the router must see the
request's body (session id, previous_response_id, tool call ids, messages), and a request from
the proxy reaches the router as an ASGI scope whose body has not been read yet. Ray's own LLM
serving does the same (an OpenAI ingress calling ``LLMServer`` replicas, whose router is the
``PrefixCacheAffinityRouter``).
"""

# No ``from __future__ import annotations``: Ray Serve rebuilds the ingress's route methods,
# and FastAPI must see real annotations on them (``request: Request``), not strings.
import asyncio
import json
import logging
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from infercept.deploy.affinity import (ROUTE_REASONS, affinity_table, prefix_hashes,
                                       request_keys)
from infercept.deploy.messages import ReplyHead, ReplyKeys, RoutedRequest
from infercept.deploy.replica import MirrorStore, ReplicaServer
from infercept.server.app import ServerConfig
from infercept.server.response_store import StoredResponse

log = logging.getLogger("infercept.deploy")

REPLICA_DEPLOYMENT = "EngineReplica"
# How often each replica reports the keys it holds to the routers (s).
ROUTING_STATS_PERIOD_S = 2.0
# The mirror actor's Ray namespace (named, so replicas find it whatever the driver's is).
MIRROR_NAMESPACE = "infercept"
# A replica that died before answering: route the request again, this many times at most.
_MAX_ATTEMPTS = 3
# A pinned request (/replicas/{id}/...) waits this long for its replica to answer.
_PIN_TIMEOUT_S = 60.0
# Headers of the replica's reply that the ingress's own response sets again.
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection"}


class _MirrorClient:
    """The :class:`~infercept.deploy.replica.ResponseMirror` a replica calls: the mirror actor."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def get(self, response_id: str) -> StoredResponse | None:
        return await self.actor.get.remote(response_id)

    async def put(self, stored: StoredResponse) -> None:
        await self.actor.put.remote(stored)

    async def delete(self, response_id: str) -> None:
        await self.actor.delete.remote(response_id)


class EngineReplica:
    """One engine and its OpenAI server app (Ray Serve deployment ``EngineReplica``).

    Args:
        engine: The :func:`~infercept.server.serve.build_engine` keyword arguments (model,
            policy, tool_paths, EngineConfig fields): the engine is built here, on a thread
            of this replica (see docs/deploy.md for why not in a child process).
        server_config: The server options (paused TTL, stored responses, API key...).
        mirror_name: The name of the stored-response mirror actor (None: no mirror).
    """

    async def __init__(self, engine: dict[str, Any], server_config: ServerConfig,
                       mirror_name: str | None, num_threads: int = 1) -> None:
        import torch

        from infercept.server.app import create_app
        from infercept.server.serve import build_engine

        torch.set_num_threads(num_threads)  # as many as the Ray CPUs the replica reserves

        self.replica = serve.get_replica_context().replica_id.unique_id
        mirror = (_MirrorClient(ray.get_actor(mirror_name, namespace=MIRROR_NAMESPACE))
                  if mirror_name else None)
        # Loading the model blocks this replica's event loop; nothing else runs here yet.
        app = create_app(build_engine(**engine), server_config)
        self.server = ReplicaServer(app, self.replica, mirror)
        await self.server.start()  # the engine loop runs before the first health check

    async def forward(self, routed: RoutedRequest):  # -> AsyncIterator[...]
        async for item in self.server.forward(routed):
            yield item

    async def record_routing_stats(self) -> dict[str, Any]:
        """What Ray Serve hands every router of this deployment with the replica set (every
        ``ROUTING_STATS_PERIOD_S``): the keys this replica holds."""
        return {"keys": self.server.held_keys()}

    async def check_health(self) -> None:
        if not self.server.is_alive:
            raise RuntimeError(f"replica {self.replica}: the engine stopped")

    async def __del__(self) -> None:
        await self.server.stop()


async def _routed(request: Request, path: str) -> RoutedRequest:
    body = await request.body()
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None  # the replica answers the 400
    parsed = parsed if isinstance(parsed, dict) else None
    method = request.method
    return RoutedRequest(
        method, path, request.url.query.encode(),
        [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw
         if k.lower() not in (b"host", b"content-length")],
        body, request_keys(method, path, parsed),
        prefix_hashes(parsed, path) if method == "POST" and parsed else [])


# Everything the ingress's methods use is defined above it: @serve.ingress copies the class
# (and what its methods name) when it is applied.
ingress_api = FastAPI(title="InferCept (Ray Serve)")


@serve.ingress(ingress_api)
class Ingress:
    """The OpenAI endpoint: every route of the single-engine server, forwarded to a replica.

    Own routes: ``GET /replicas`` (the live replicas the router knows, with their Ray actor
    names), ``/replicas/{id}/{path}`` (``path`` on that replica only, e.g. its ``metrics``),
    and ``GET /metrics`` (how requests were routed, by reason; each replica's own metrics are
    at ``/replicas/{id}/metrics``).
    """

    def __init__(self, replicas: DeploymentHandle) -> None:
        self.replicas = replicas
        app_name = serve.get_replica_context().app_name
        self.app_name = app_name
        self.table = affinity_table(app_name, REPLICA_DEPLOYMENT)

    @ingress_api.get("/replicas")
    async def list_replicas(self) -> dict[str, Any]:
        await self._ensure_router()
        return {"replicas": [{"id": r, "actor_name": self._actor_name(r)}
                             for r in sorted(self.table.live)]}

    @ingress_api.get("/metrics")
    async def metrics(self) -> Response:
        lines = ["# HELP infercept_router_requests_total Requests routed to a replica, by why.",
                 "# TYPE infercept_router_requests_total counter"]
        lines += [f'infercept_router_requests_total{{reason="{r}"}} {self.table.num_routed[r]}'
                  for r in ROUTE_REASONS]
        lines += ["# HELP infercept_router_replicas Live engine replicas.",
                  "# TYPE infercept_router_replicas gauge",
                  f"infercept_router_replicas {len(self.table.live)}",
                  "# HELP infercept_router_keys Context keys mapped to a replica.",
                  "# TYPE infercept_router_keys gauge", f"infercept_router_keys {len(self.table)}",
                  "# HELP infercept_router_dropped_keys_total Keys dropped with their replica.",
                  "# TYPE infercept_router_dropped_keys_total counter",
                  f"infercept_router_dropped_keys_total {self.table.num_dropped_keys}"]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @ingress_api.api_route("/replicas/{replica}/{path:path}", methods=["GET", "POST", "DELETE"])
    async def pinned(self, replica: str, path: str, request: Request) -> Response:
        await self._ensure_router()
        if replica not in self.table.live:
            return JSONResponse({"error": {
                "message": f"no live replica {replica!r}; live: {sorted(self.table.live)}",
                "type": "not_found_error"}}, status_code=404)
        routed = await _routed(request, "/" + path)
        routed.pin = replica
        return await self._forward(routed, timeout_s=_PIN_TIMEOUT_S)

    @ingress_api.api_route("/{path:path}", methods=["GET", "POST", "DELETE"])
    async def forward(self, path: str, request: Request) -> Response:
        routed = await _routed(request, "/" + path)
        return await self._forward(routed)

    # ---- forwarding ----------------------------------------------------------------------

    async def _ensure_router(self) -> None:
        """The handle's router starts with its first call; until then it knows no replicas."""
        if not self.table.live:
            await self._forward(RoutedRequest("GET", "/health"), timeout_s=_PIN_TIMEOUT_S)

    def _actor_name(self, replica: str) -> str:
        from ray.serve._private.common import DeploymentID, ReplicaID

        return ReplicaID(replica, DeploymentID(REPLICA_DEPLOYMENT,
                                               self.app_name)).to_full_id_str()

    async def _forward(self, routed: RoutedRequest, timeout_s: float | None = None
                       ) -> Response:
        owner = self.table.owner(routed.context_keys)
        prefix_owner, _ = self.table.prefix_owner(routed.prefix_hashes)
        lost = owner is None and self.table.is_lost(routed.context_keys)
        for attempt in range(_MAX_ATTEMPTS):
            stream = self.replicas.options(stream=True).forward.remote(routed)
            try:
                head = await asyncio.wait_for(stream.__anext__(), timeout_s)
            except (RayActorError, RayServeException) as exc:
                # Died before answering (the router drops it): route again.
                log.warning("replica failed before answering %s %s (%s); attempt %d of %d",
                            routed.method, routed.path, exc, attempt + 1, _MAX_ATTEMPTS)
                lost = lost or owner is not None
                owner = None
                continue
            except TimeoutError:
                stream.cancel()
                return JSONResponse({"error": {"message": f"no replica answered within "
                                               f"{timeout_s:g} s", "type": "server_error"}},
                                    status_code=503)
            break
        else:
            return JSONResponse({"error": {"message": f"{_MAX_ATTEMPTS} replicas failed "
                                           "before answering", "type": "server_error",
                                           "code": "engine_unavailable"}}, status_code=503)
        assert isinstance(head, ReplyHead)
        # A request whose context's replica was known but served elsewhere: that replica
        # died (the router never sends a known context elsewhere).
        reason = ("pinned" if routed.pin else "context" if owner == head.replica
                  else "lost" if lost or owner is not None
                  else "prefix" if prefix_owner == head.replica else "load")
        self.table.num_routed[reason] += 1
        if head.status == 200:
            self.table.learn_prefixes(head.replica, routed.prefix_hashes)
        headers = {k: v for k, v in head.headers if k not in _HOP_HEADERS}
        headers["x-infercept-replica"] = head.replica
        is_stream = headers.get("content-type", "").startswith("text/event-stream")

        async def body():
            try:
                async for item in stream:
                    if isinstance(item, ReplyKeys):
                        self.table.learn(item.replica, item.keys)
                    else:
                        yield item
            except (RayActorError, RayServeException) as exc:
                # The replica died mid-reply; the status has gone out: end on an error.
                message = f"replica {head.replica} failed mid-reply: {exc}"
                log.warning(message)
                if is_stream:
                    yield f"data: {json.dumps({'error': {'message': message}})}\n\n".encode()
            finally:
                stream.cancel()

        return StreamingResponse(body(), status_code=head.status, headers=headers)


# ---- the application ---------------------------------------------------------------------

def build_app(engine: dict[str, Any], server_config: ServerConfig, num_replicas: int,
              num_cpus_per_replica: float = 0.5, max_ongoing_requests: int = 64,
              mirror_name: str | None = None, imbalanced_threshold: int = 4
              ) -> serve.Application:
    """The Ray Serve application (bind only; :func:`infercept.deploy.run` runs it).

    Args:
        engine: :func:`~infercept.server.serve.build_engine` keyword arguments.
        server_config: Each replica's server options.
        num_replicas: Engine replicas (>= 1).
        num_cpus_per_replica: Ray CPUs each replica reserves (its torch threads: that many,
            at least 1).
        max_ongoing_requests: Requests one replica takes at once (its queue bound).
        mirror_name: The stored-response mirror actor, started by :func:`start_mirror`.
        imbalanced_threshold: How many more queued requests than the least loaded replica
            the replica holding a request's prefix may have and still get it.
    """
    if num_replicas < 1:
        raise ValueError(f"num_replicas={num_replicas} must be >= 1")
    replica = serve.deployment(
        EngineReplica, name=REPLICA_DEPLOYMENT, num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests, health_check_period_s=2.0,
        ray_actor_options={"num_cpus": num_cpus_per_replica},
        request_router_config=RequestRouterConfig(
            request_router_class="infercept.deploy.router:InterceptAffinityRouter",
            request_router_kwargs={"imbalanced_threshold": imbalanced_threshold},
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S))
    ingress = serve.deployment(Ingress, name="Ingress", num_replicas=1,
                               max_ongoing_requests=1024,
                               ray_actor_options={"num_cpus": 0.1})
    num_threads = max(1, int(num_cpus_per_replica))
    return ingress.bind(replica.bind(engine, server_config, mirror_name, num_threads))


def start_mirror(server_config: ServerConfig, name: str = "infercept-response-mirror") -> str:
    """Starts (or finds) the stored-response mirror actor; returns its name."""
    actor = ray.remote(MirrorStore).options(name=name, namespace=MIRROR_NAMESPACE,
                                            get_if_exists=True, num_cpus=0,
                                            lifetime="detached")
    actor.remote(server_config.stored_response_ttl_s, server_config.max_stored_responses,
                 server_config.max_stored_response_bytes)
    return name

