"""Per-request latency of the engine in its own process vs on a thread, without HTTP.

Isolates what the process split costs (IPC, a second interpreter) from the HTTP layer: one
few-shot chat prompt (~175 tokens), 8 greedy tokens, sent N times one after another through
``EngineProcessClient`` and through ``EngineLoop``. Run on a quiet machine:

    python benchmarks/engine_split_ab.py process
    python benchmarks/engine_split_ab.py thread
"""

from __future__ import annotations

import argparse
import asyncio
import time

from infercept.engine import EngineConfig, LLMEngine
from infercept.sampling import SamplingParams
from infercept.server.engine_loop import EngineLoop
from infercept.server.engine_process import EngineProcessClient, EngineSpec
from infercept.server.few_shot import FEW_SHOT


async def _run(mode: str, num_requests: int) -> None:
    config = EngineConfig(max_model_len=2048, enable_prefix_caching=False)
    if mode == "process":
        client = EngineProcessClient(EngineSpec(config=config))
        tokenizer = client.frontend.tokenizer
        loop: EngineLoop | EngineProcessClient = client
    else:
        engine = LLMEngine(config)
        loop, tokenizer = EngineLoop(engine), engine.tokenizer
    loop.start()
    ids = tokenizer.apply_chat_template([*FEW_SHOT, {"role": "user", "content": "What is 3 + 4?"}])
    latencies_s = []
    for _ in range(num_requests):
        start = time.monotonic()
        handle = await loop.add(ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        while not (await handle.updates.get()).finished:
            pass
        latencies_s.append(time.monotonic() - start)
    await loop.close()
    print(f"{mode}: {len(ids)} prompt tokens, 8 generated; seconds per request: "
          f"{', '.join(f'{s:.2f}' for s in latencies_s)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["process", "thread"])
    parser.add_argument("--requests", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(_run(args.mode, args.requests))


if __name__ == "__main__":
    main()
