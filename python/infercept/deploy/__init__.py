"""N engine replicas behind one OpenAI endpoint on Ray Serve (the ``distributed`` extra).

``infercept serve --replicas N`` calls :func:`run`. A follow-up that carries a session id, a
``previous_response_id`` or a tool result goes to the replica holding its paused context;
requests with a known prefix prefer the replica that served it; the rest go by queue length
(docs/deploy.md). Only this package imports Ray; without it, :func:`require_ray` says how to
install it.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["require_ray", "run", "DEFAULT_APP_NAME"]

DEFAULT_APP_NAME = "infercept"


def require_ray() -> None:
    """Raises ImportError naming the extra when Ray Serve is not installed."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "infercept serve --replicas needs Ray Serve: pip install 'infercept[distributed]' "
            f"(or 'ray[serve]'); importing it failed: {error}") from None


def run(engine: dict[str, Any], server_config: Any, num_replicas: int, host: str, port: int,
        num_cpus_per_replica: float = 0.5, app_name: str = DEFAULT_APP_NAME,
        address: str | None = None, block: bool = True) -> Any:
    """Starts Ray (or joins ``address``), the mirror, and the application on ``host:port``.

    Args:
        engine: :func:`~infercept.server.serve.build_engine` keyword arguments.
        server_config: A :class:`~infercept.server.app.ServerConfig` for every replica.
        num_replicas: Engine replicas.
        num_cpus_per_replica: Ray CPUs each reserves.
        app_name: The Ray Serve application's name.
        address: A Ray cluster to join (None: start one on this machine, or join the one
            ``RAY_ADDRESS`` names).
        block: Serve until interrupted (False: return the ingress's handle).
    """
    require_ray()
    import ray
    from ray import serve

    from infercept.deploy.serve_app import build_app, start_mirror

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    mirror = start_mirror(server_config)
    handle = serve.run(build_app(engine, server_config, num_replicas, num_cpus_per_replica,
                                 mirror_name=mirror), name=app_name, route_prefix="/")
    if not block:
        return handle
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return None
