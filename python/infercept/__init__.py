"""InferCept: a serving engine for augmented LLMs.

Requests that pause mid-generation to call a tool keep their KV cache by discard (recompute
later, in chunks), preserve (keep on the device) or swap (to pinned host memory), chosen per
request and per iteration to minimise wasted device memory-time.

Packages: ``engine`` (step loop, model runner, sampler, swap, profiler), ``model`` and
``weights`` (Llama over paged KV, loaders), ``tools``, ``server`` (OpenAI API), ``bench`` (the
simulator and the benchmark). This module re-exports what a user imports.
"""

from infercept._core import (
    BlockError,
    BlockPool,
    CostModel,
    InferceptError,
    InvalidArgumentError,
    OutOfBlocksError,
    Policy,
    RequestState,
    Scheduler,
    SchedulerConfig,
    StateError,
    StepPlan,
    StepResult,
    Tier,
    UnknownRequestError,
)
from infercept._core import __version__
from infercept.bench.executor import SimulatedExecutor
from infercept.engine.executor import Executor
from infercept.bench.replay import ReplayEngine, ReplayResult, simulated_config
from infercept.engine import EngineConfig, InterceptRecord, LLMEngine, RequestOutput
from infercept.engine.profiles import load_profile
from infercept.llm import LLM
from infercept.sampling import SamplingParams, ScriptedIntercept
from infercept.structured_output import StructuredOutput
from infercept.tools import Tool, ToolRegistry

__all__ = [
    "BlockError",
    "BlockPool",
    "CostModel",
    "EngineConfig",
    "Executor",
    "InferceptError",
    "InterceptRecord",
    "InvalidArgumentError",
    "LLM",
    "LLMEngine",
    "OutOfBlocksError",
    "Policy",
    "ReplayEngine",
    "ReplayResult",
    "RequestOutput",
    "RequestState",
    "SamplingParams",
    "Scheduler",
    "ScriptedIntercept",
    "SchedulerConfig",
    "SimulatedExecutor",
    "StateError",
    "StepPlan",
    "StepResult",
    "StructuredOutput",
    "Tier",
    "Tool",
    "ToolRegistry",
    "UnknownRequestError",
    "__version__",
    "load_profile",
    "simulated_config",
]
