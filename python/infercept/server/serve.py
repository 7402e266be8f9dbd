"""``infercept serve``: build the engine, load server-side tools, run uvicorn."""

from __future__ import annotations

import ipaddress
import logging

from infercept.engine import EngineConfig, LLMEngine
from infercept.server.app import ServerConfig, create_app
from infercept.server.engine_process import EngineSpec
from infercept.server.tool_plugins import load_tools

log = logging.getLogger("infercept.server")


def build_engine(model: str | None, policy: str, tool_paths: list[str] = (),
                 entry_point_tools: bool = True, **config: object) -> LLMEngine:
    """An engine with the server-side tools of ``tool_paths`` and the installed entry points.

    Args:
        model: A model path, or None / 'default' for the embedded SmolLM2.
        policy: The intercept policy.
        tool_paths: ``module:attr`` targets (see ``tool_plugins``).
        entry_point_tools: Also load the ``infercept.tools`` entry points.
        **config: Other :class:`EngineConfig` fields.
    """
    tools = load_tools(tool_paths, entry_point_tools)
    engine_config = EngineConfig(model=None if model in (None, "default") else model,
                                 policy=policy, **config)  # type: ignore[arg-type]
    # A failing server tool is reported to the model, not turned into a failed response.
    return LLMEngine(engine_config, tools=tools, tool_errors="return")


def engine_spec(model: str | None, policy: str, tool_paths: list[str] = (),
                entry_point_tools: bool = True, **config: object) -> EngineSpec:
    """What the engine process builds: the engine :func:`build_engine` would (the tools are
    loaded there, by name). Invalid engine options fail here, before the process starts."""
    engine_config = EngineConfig(model=None if model in (None, "default") else model,
                                 policy=policy, **config)  # type: ignore[arg-type]
    return EngineSpec(config=engine_config, tool_paths=list(tool_paths),
                      entry_point_tools=entry_point_tools, tool_errors="return")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (``localhost``, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve beyond loopback


def serve(engine: LLMEngine | EngineSpec, host: str, port: int,
          config: ServerConfig | None = None, log_level: str = "info") -> None:
    """Runs the server until interrupted (an EngineSpec: the engine in its own process)."""
    import uvicorn

    logging.basicConfig(level=log_level.upper())
    if not is_loopback(host) and not (config and config.api_key):
        log.warning("!!! serving on %s:%d, beyond loopback, WITHOUT an API key: anyone who can "
                    "reach this address can run the model. Pass --api-key or set "
                    "INFERCEPT_API_KEY. !!!", host, port)
    uvicorn.run(create_app(engine, config), host=host, port=port, log_level=log_level)
