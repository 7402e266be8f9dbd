"""OpenAI-compatible HTTP server whose client-side tool calls keep their paused context.

Needs the ``server`` extra (fastapi, uvicorn).
"""

from infercept.server.app import OpenAIServer, ServerConfig, create_app
from infercept.server.serve import build_engine, serve

__all__ = ["OpenAIServer", "ServerConfig", "build_engine", "create_app", "serve"]
