"""Runs requests on real vLLM; the vLLM side of bench_vs_vllm.py and bench_decode.py.

This file runs under the vLLM venv's python (benchmarks/vllm_env.sh), never under infercept's:
it imports vllm only, and talks to the infercept-side script by two JSON files.

    <vllm venv>/bin/python benchmarks/vllm_driver.py IN.json OUT.json

IN.json: {"mode": "replay" | "decode", "engine": {...AsyncEngineArgs / EngineArgs fields...},
and for "replay": "runs" (a list of {"programs": [...]} (below), one per request rate, run one
after the other on one engine, its prefix cache reset between them) and "max_time_s" (null: no
cut); for "decode": "prompts" (lists of token ids), "batches", "new_tokens", "repeats"}.

Replay: each program is an agent request as vLLM users run one. Its first turn is a request
(the program's prompt ids, ``max_tokens`` = the turn's output, EOS ignored, greedy); at the
intercept point the request ends; after the tool's sleep the continuation (the context so far:
prompt + every output + every tool output) is submitted as a new request, whose prefix vLLM's
prefix cache finds. vLLM knows nothing of the tool: this is exactly what an agent framework on
vLLM does. Program = {"id", "arrival_s", "prompt_ids", "turns": [{"max_tokens", "tool_s",
"tool_ids"}, ..., {"max_tokens"}]} (the last turn has no tool). Times in OUT.json are seconds
from the run's start, as infercept's RequestRecord has them.

Decode: vLLM's offline ``LLM.generate`` on ``batch`` prompts at once for each batch size, best of
``repeats`` runs of ``new_tokens`` and of 1 new token (the difference is the decode phase).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time


def versions() -> dict:
    import torch
    import vllm
    return {"vllm": vllm.__version__, "torch": torch.__version__,
            "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}}


async def run_program(engine, program: dict, start: float) -> dict:
    """One agent program: its turns as requests, the tool sleeps between them."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    await asyncio.sleep(max(0.0, program["arrival_s"] - (time.perf_counter() - start)))
    arrival = time.perf_counter() - start
    context = list(program["prompt_ids"])
    record = {"id": program["id"], "arrival_s": arrival, "first_token_s": None, "finish_s": None,
              "num_output_tokens": 0, "tool_time_s": 0.0, "resumed_ttfts_s": [],
              "num_cached_tokens": [], "num_prompt_tokens": []}
    tool_return = None
    for index, turn in enumerate(program["turns"]):
        params = SamplingParams(temperature=0.0, max_tokens=turn["max_tokens"],
                                min_tokens=turn["max_tokens"], ignore_eos=True, detokenize=False,
                                output_kind=RequestOutputKind.DELTA)
        output_ids: list[int] = []
        first = True
        async for out in engine.generate({"prompt_token_ids": context}, params,
                                         request_id=f"{program['id']}/{index}"):
            now = time.perf_counter() - start
            new = out.outputs[0].token_ids
            if first and new:
                first = False
                if record["first_token_s"] is None:
                    record["first_token_s"] = now
                if tool_return is not None:
                    record["resumed_ttfts_s"].append(max(0.0, now - tool_return))
                record["num_cached_tokens"].append(out.num_cached_tokens or 0)
                record["num_prompt_tokens"].append(len(context))
            output_ids.extend(new)
            record["num_output_tokens"] += len(new)
        context += output_ids
        if "tool_s" in turn and index + 1 < len(program["turns"]):
            await asyncio.sleep(turn["tool_s"])
            record["tool_time_s"] += turn["tool_s"]
            tool_return = time.perf_counter() - start
            context += turn["tool_ids"]
    record["finish_s"] = time.perf_counter() - start
    return record


async def replay_run(engine, programs: list[dict], max_time_s: float | None) -> dict:
    """One run: every program on its own task, arrivals on the run's clock, cut at max_time_s."""
    start = time.perf_counter()
    tasks = {asyncio.ensure_future(run_program(engine, p, start)): p for p in programs}
    done, pending = await asyncio.wait(tasks, timeout=max_time_s)
    end = time.perf_counter() - start
    records = [t.result() for t in done]
    for task in pending:  # unfinished programs count as unfinished, as in infercept's replay
        task.cancel()
        program = tasks[task]
        records.append({"id": program["id"], "arrival_s": program["arrival_s"],
                        "first_token_s": None, "finish_s": None, "num_output_tokens": 0,
                        "tool_time_s": 0.0, "resumed_ttfts_s": [], "unfinished": True})
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    return {"records": records, "end_s": end}


async def replay(spec: dict) -> dict:
    """Every run of ``spec["runs"]`` on one engine, its prefix cache emptied between runs."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**spec["engine"]))
    runs = []
    try:
        # Warm-up outside the clock: the first forwards allocate and pick kernels.
        await run_program(engine, {"id": "warmup", "arrival_s": 0.0, "prompt_ids": [100] * 40,
                                   "turns": [{"max_tokens": 4}]}, time.perf_counter())
        for run in spec["runs"]:
            await engine.reset_prefix_cache()
            began = time.perf_counter()
            runs.append(await replay_run(engine, run["programs"], spec.get("max_time_s")))
            print(f"vllm run {len(runs)}/{len(spec['runs'])}: {len(run['programs'])} programs in "
                  f"{time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)
    finally:
        engine.shutdown()
    return {"runs": runs}


def decode(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(**spec["engine"])

    def timed(prompts: list[list[int]], new_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens,
                                ignore_eos=True, detokenize=False)
        begin = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - begin
        if any(len(o.outputs[0].token_ids) != new_tokens for o in outs):
            raise RuntimeError(f"vLLM returned other than {new_tokens} tokens per prompt")
        first_ids[:] = list(outs[0].outputs[0].token_ids)
        return seconds

    rows = []
    first_ids: list[int] = []  # the greedy output of prompts[0], the last run's
    new_tokens = spec["new_tokens"]
    for batch in spec["batches"]:
        prompts = spec["prompts"][:batch]
        timed(prompts[:1], 2)  # warm-up
        full = [timed(prompts, new_tokens) for _ in range(spec["repeats"])]
        prefill = [timed(prompts, 1) for _ in range(spec["repeats"])]
        rows.append({"batch": batch, "full_s": full, "prefill_s": prefill})
    timed(spec["prompts"][:1], new_tokens)
    return {"rows": rows, "first_prompt_output_ids": first_ids}


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: {sys.argv[0]} IN.json OUT.json")
    spec = json.loads(open(sys.argv[1]).read())
    if spec["mode"] == "replay":
        result = asyncio.run(replay(spec))
    elif spec["mode"] == "decode":
        result = decode(spec)
    else:
        raise SystemExit(f"mode={spec['mode']!r} must be 'replay' or 'decode'")
    result["versions"] = versions()
    with open(sys.argv[2], "w") as out:
        json.dump(result, out)


if __name__ == "__main__":
    main()
