"""Which compute backend this process can use: CUDA when compiled and a device is present, else CPU.

``infercept._core`` reports whether the CUDA backend was compiled in and how many devices the
CUDA runtime sees; torch must see the device too (the model runs through torch). The best
device is CUDA, CPU last (DESIGN.md §4). Asking for CUDA where there is none is an error that
says which part is missing; falling back from ``auto`` logs one line saying why.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from infercept import _core

logger = logging.getLogger("infercept")

DEVICES = ("auto", "cpu", "cuda")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run in this process (not compiled, or no device)."""


@dataclasses.dataclass(frozen=True)
class BackendReport:
    """What this process has.

    Attributes:
        cuda_compiled: ``infercept._core`` was built with the CUDA backend.
        num_cuda_devices: Devices the CUDA runtime sees from ``_core`` (0 if not compiled).
        torch_cuda: torch was built with CUDA and sees a device.
        device_name: Name of CUDA device 0 as torch reports it, or None.
    """

    cuda_compiled: bool
    num_cuda_devices: int
    torch_cuda: bool
    device_name: str | None

    @property
    def can_use_cuda(self) -> bool:
        """Whether the CUDA backend can run: compiled, a device, and torch sees it."""
        return self.cuda_compiled and self.num_cuda_devices > 0 and self.torch_cuda

    def why_not_cuda(self) -> str:
        """Why :attr:`can_use_cuda` is false (empty when it is true)."""
        if not self.cuda_compiled:
            return ("infercept._core was built without the CUDA backend (rebuild with nvcc on "
                    "PATH and INFERCEPT_CUDA=ON)")
        if self.num_cuda_devices == 0:
            return "the CUDA runtime sees no device (no GPU, no driver, or CUDA_VISIBLE_DEVICES)"
        if not self.torch_cuda:
            return f"torch {torch.__version__} has no CUDA support or sees no device"
        return ""


def report() -> BackendReport:
    """What the native core and torch can use in this process."""
    torch_cuda = bool(torch.cuda.is_available())
    return BackendReport(
        cuda_compiled=bool(_core.cuda_compiled),
        num_cuda_devices=int(_core.cuda_device_count()),
        torch_cuda=torch_cuda,
        device_name=torch.cuda.get_device_name(0) if torch_cuda else None,
    )


def select_device(requested: str = "auto") -> torch.device:
    """The device to run on.

    Args:
        requested: ``'auto'`` (CUDA when usable, else CPU with a logged message), ``'cpu'``,
            ``'cuda'`` or ``'cuda:N'``.

    Raises:
        ValueError: ``requested`` is not one of those.
        BackendUnavailableError: CUDA was requested but cannot run; the message says why.
    """
    if requested == "cpu":
        return torch.device("cpu")
    if requested != "auto" and requested != "cuda" and not requested.startswith("cuda:"):
        raise ValueError(f"device={requested!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
    have = report()
    if requested == "auto":
        if have.can_use_cuda:
            return torch.device("cuda")
        logger.info("infercept: running on CPU: %s", have.why_not_cuda())
        return torch.device("cpu")
    if not have.can_use_cuda:
        raise BackendUnavailableError(f"device={requested!r} was requested but CUDA cannot run: "
                                      f"{have.why_not_cuda()}")
    device = torch.device(requested)
    if device.index is not None and device.index >= have.num_cuda_devices:
        raise BackendUnavailableError(f"device={requested!r}: only {have.num_cuda_devices} CUDA "
                                      f"device(s) are visible")
    return device
