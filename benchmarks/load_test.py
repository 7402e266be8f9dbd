"""Bounded load test of the OpenAI-compatible server over loopback.

Sends N chat completions (default 200) at a fixed concurrency: most are plain questions, a
fraction are client-tool round trips (the call, then the follow-up with the tool result, which
resumes the paused context). Reports throughput and p50/p99 latency per HTTP request, and
writes JSON and markdown under benchmarks/results/.

    python benchmarks/load_test.py                      # starts a server, 200 requests
    python benchmarks/load_test.py --no-engine-process  # the same, engine on a server thread
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --requests 500

A started server runs the engine in its own process (``infercept serve``'s default) unless
``--no-engine-process`` is given: the two runs are the before/after of the process split.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from infercept.server.few_shot import CALCULATOR, FEW_SHOT
from infercept.server.metrics import parse_metrics

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]



def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metrics(url: str) -> dict[str, float]:
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=60).text)


async def _run(args: argparse.Namespace, url: str, model: str) -> dict:
    latencies_s: list[float] = []
    completion_tokens = 0
    errors: list[str] = []
    counter = iter(range(args.requests))
    num_tool_every = max(1, round(1 / args.tool_fraction)) if args.tool_fraction > 0 else 0

    async def post(client: httpx.AsyncClient, body: dict) -> dict:
        nonlocal completion_tokens
        start = time.perf_counter()
        response = await client.post(f"{url}/v1/chat/completions", json=body)
        latencies_s.append(time.perf_counter() - start)
        if response.status_code != 200:
            errors.append(f"{response.status_code}: {response.text[:200]}")
            return {}
        out = response.json()
        completion_tokens += out["usage"]["completion_tokens"]
        return out

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            base = {"model": model, "temperature": 0, "max_tokens": args.max_tokens}
            if num_tool_every and i % num_tool_every == 0:
                messages = [*FEW_SHOT, {"role": "user", "content": f"What is {i} + 5?"}]
                first = await post(client, {**base, "messages": messages, "tools": [CALCULATOR],
                                            "max_tokens": max(args.max_tokens, 40)})
                choice = (first.get("choices") or [{}])[0]
                if choice.get("finish_reason") == "tool_calls":
                    message = choice["message"]
                    call_id = message["tool_calls"][0]["id"]
                    await post(client, {**base, "tools": [CALCULATOR], "messages": [
                        *messages, message,
                        {"role": "tool", "tool_call_id": call_id, "content": str(i + 5)}]})
            else:
                await post(client, {**base, "messages": [
                    {"role": "user", "content": f"Give me a fun fact about the number {i}."}]})

    before = _metrics(url)
    start = time.perf_counter()
    limits = httpx.Limits(max_connections=args.concurrency)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(timeout=600, limits=limits, headers=headers) as client:
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))
    elapsed_s = time.perf_counter() - start
    after = _metrics(url)
    delta = lambda key: after.get(key, 0.0) - before.get(key, 0.0)  # noqa: E731
    return {
        "num_logical_requests": args.requests,
        "num_http_requests": len(latencies_s),
        "num_errors": len(errors),
        "errors": errors[:5],
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "tool_fraction": args.tool_fraction,
        "elapsed_s": elapsed_s,
        "throughput_rps": len(latencies_s) / elapsed_s,
        "completion_tokens": completion_tokens,
        "completion_tokens_per_s": completion_tokens / elapsed_s,
        "latency_mean_s": statistics.fmean(latencies_s) if latencies_s else float("nan"),
        "latency_p50_s": _percentile(latencies_s, 50),
        "latency_p99_s": _percentile(latencies_s, 99),
        "latency_max_s": max(latencies_s, default=float("nan")),
        "paused_context_reused": delta('infercept_paused_context_total{outcome="reused"}'),
        "paused_context_fallback": delta('infercept_paused_context_total{outcome="fallback"}'),
        "reused_prompt_tokens": delta("infercept_reused_prompt_tokens_total"),
    }


def _markdown(result: dict) -> str:
    r = result["result"]
    return "\n".join([
        "# Server load test (loopback)", "",
        f"- command: `{result['command']}`",
        f"- machine: {result['machine']}",
        f"- server: {result['server']}", "",
        "| requests (HTTP) | concurrency | max_tokens | tool round trips | elapsed s | req/s | "
        "tokens/s | p50 s | p99 s | errors | contexts reused | fallbacks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['num_logical_requests']} ({r['num_http_requests']}) | {r['concurrency']} | "
        f"{r['max_tokens']} | {r['tool_fraction']:.0%} | {r['elapsed_s']:.1f} | "
        f"{r['throughput_rps']:.2f} | {r['completion_tokens_per_s']:.1f} | "
        f"{r['latency_p50_s']:.2f} | {r['latency_p99_s']:.2f} | {r['num_errors']} | "
        f"{r['paused_context_reused']:.0f} | {r['paused_context_fallback']:.0f} |", "",
        "Latency is per HTTP request (a tool round trip is two). The machine is shared; "
        "timings are noisy.", ""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="a running server (default: start one)")
    parser.add_argument("--api-key", default=os.environ.get("INFERCEPT_API_KEY"),
                        help="the server's API key (default: INFERCEPT_API_KEY)")
    parser.add_argument("--model", default="default", help="model name the server serves")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--tool-fraction", type=float, default=0.25,
                        help="fraction of requests that are client-tool round trips")
    parser.add_argument("--policy", default="infercept", help="policy of a started server")
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                        help="a started server runs the engine in its own process (default) "
                             "or, with --no-engine-process, on a thread of the server process")
    parser.add_argument("--out", default=str(RESULTS / "server_load"),
                        help="output path without extension (.json and .md are written)")
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]

    process = None
    url = args.url
    if url is None:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO / "python"), os.environ.get("PYTHONPATH")]))}
        process = subprocess.Popen(
            [sys.executable, "-m", "infercept.cli", "serve", "--port", str(port), "--policy",
             args.policy, "--log-level", "warning",
             "--engine-process" if args.engine_process else "--no-engine-process"], env=env)
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise SystemExit("the server did not start")
            time.sleep(0.5)
    try:
        result = asyncio.run(_run(args, url, args.model))
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)
    payload = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} CPU cores (shared; load average "
                   f"{load_at_start:.1f} at the start)",
        "server": f"started by the script ({args.policy} policy, SmolLM2-135M on CPU, "
                  f"engine {'process' if args.engine_process else 'thread'})"
                  if process is not None else url,
        "result": result,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(payload))
    print(_markdown(payload))
    return 1 if result["num_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
