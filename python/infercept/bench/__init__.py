"""The simulator and the benchmark: workloads, the replay loop (virtual or wall clock), metrics,
the policy-by-rate grid runner, calibration, plots and the `simulate`/`bench`/`profile` commands."""

from infercept.bench.calibrate import calibration_errors
from infercept.bench.generator import AUGMENTATION_TYPES, AugmentationType, generate_workload
from infercept.bench.runner import BenchSetup, run_grid, run_one

__all__ = ["AUGMENTATION_TYPES", "AugmentationType", "BenchSetup", "calibration_errors",
           "generate_workload", "run_grid", "run_one"]
