"""The simulator and the benchmark: workloads (the paper's trace and types, agent programs), the
replay loop (virtual or wall clock), metrics, the policy-by-rate grid runner, calibration, plots
and the `simulate`/`bench`/`profile` commands."""

from infercept.bench.agents import AGENT_SHAPES, AgentShape, generate_programs
from infercept.bench.calibrate import calibration_errors
from infercept.bench.generator import AUGMENTATION_TYPES, AugmentationType, generate_workload
from infercept.bench.runner import BenchSetup, run_grid, run_one

__all__ = ["AGENT_SHAPES", "AUGMENTATION_TYPES", "AgentShape", "AugmentationType", "BenchSetup",
           "calibration_errors", "generate_programs", "generate_workload", "run_grid", "run_one"]
