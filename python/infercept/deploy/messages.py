"""What the ingress and the replicas pass each other through Ray Serve handles (plain data).

One HTTP request becomes one :class:`RoutedRequest`; the replica answers with a stream:
a :class:`ReplyHead`, the body's chunks (``bytes``), and a :class:`ReplyKeys` just before the
last chunk, so the ingress has learned the keys the reply hands out before the client can see
the end of the reply (and send the follow-up that names them).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RoutedRequest:
    """One HTTP request, with what the request router needs to place it.

    Attributes:
        method, path, query_string, headers, body: The HTTP request (headers as latin-1
            ``(name, value)`` pairs, lower-case names).
        context_keys: The paused-context keys it names, most specific first
            (``affinity.request_keys``).
        prefix_hashes: Its prefix hash chain, shortest first (``affinity.prefix_hashes``).
        pin: A replica's unique id: route there or nowhere (``/replicas/{id}/...``).
    """

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    context_keys: list[str] = field(default_factory=list)
    prefix_hashes: list[str] = field(default_factory=list)
    pin: str | None = None


@dataclass
class ReplyHead:
    """The start of a reply: its status and headers, and the replica that sends it."""

    status: int
    headers: list[tuple[str, str]]
    replica: str


@dataclass
class ReplyKeys:
    """The paused-context keys the reply handed out (``affinity.reply_keys``)."""

    replica: str
    keys: list[str]
