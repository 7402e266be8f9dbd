"""OpenAI-compatible HTTP server whose client-side tool calls keep their paused context.

Needs the ``server`` extra (fastapi, uvicorn, prometheus_client, pyzmq, msgspec).
"""

from infercept.server.app import OpenAIServer, ServerConfig, create_app
from infercept.server.engine_process import EngineSpec
from infercept.server.serve import build_engine, engine_spec, serve

__all__ = ["EngineSpec", "OpenAIServer", "ServerConfig", "build_engine", "create_app",
           "engine_spec", "serve"]
