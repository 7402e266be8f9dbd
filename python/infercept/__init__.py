"""InferCept: a serving engine for augmented LLMs.

Requests that pause mid-generation to call a tool keep their KV cache by discard (recompute
later, in chunks), preserve (keep on the device) or swap (to pinned host memory), chosen per
request and per iteration to minimise wasted device memory-time.
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
from infercept.executor import Executor, SimulatedExecutor
from infercept.profiles import load_profile
from infercept.replay import ReplayEngine, ReplayResult, simulated_config

__all__ = [
    "BlockError",
    "BlockPool",
    "CostModel",
    "Executor",
    "InferceptError",
    "InvalidArgumentError",
    "OutOfBlocksError",
    "Policy",
    "ReplayEngine",
    "ReplayResult",
    "RequestState",
    "Scheduler",
    "SchedulerConfig",
    "SimulatedExecutor",
    "StateError",
    "StepPlan",
    "StepResult",
    "Tier",
    "UnknownRequestError",
    "__version__",
    "load_profile",
    "simulated_config",
]
