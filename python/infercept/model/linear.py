"""Linear layers whose float32 CPU weights are packed once, for the native kernel or oneDNN.

``F.linear`` on the CPU runs MKL's sgemm on the weight as stored, every step. Both packed paths
reorder a weight once, after loading, and run each step's product on that copy:

- ``native``: ``infercept._core.cpu_linear`` (``cpp/src/cpu_linear*.cpp``) on column panels of
  16 outputs, each k-major, so one row streams the weight in address order and more rows feed
  an 8-row x 32-column AVX-512 tile (AVX2+FMA and portable bodies elsewhere).
- ``onednn``: torch's bundled oneDNN on its own blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight``), as vLLM's CPU backend does.

On the 2-core AVX-512 EPYC (Zen 4) of benchmarks/results/cpu_linear_zen4.md, at SmolLM2's
shapes with the weights coming from memory, the native kernel reads the weight at 30-42 GB/s
at one row where oneDNN reaches 16-21 and MKL 10-13 (median calls), is 1.2-1.8x oneDNN's
speed at 8 rows and 1.0-1.5x at 32 (decode batches), and within 5 % of it at 128-512 rows
(prefill chunks; oneDNN ahead only on the LM head, which runs on one row per sequence). So
``auto`` takes the native kernel wherever it can run. Decode at batch 1 went from 21-24 to
28-32 tokens/s end to end (25-27 to 35 with the native layer ops). Results differ from MKL's
only by float rounding (~1e-5 relative).

Packing is a step after loading (:meth:`Linear.pack`, called by
``LlamaForCausalLM.process_weights_after_loading`` once the model is on its device): the plain
weight is then dropped, so the packed copy replaces it instead of doubling memory.
``$INFERCEPT_CPU_LINEAR`` chooses: ``auto`` (default: native for float32 CPU weights when the
core has the kernel, else oneDNN when torch has it, else ``F.linear``), ``native`` or
``onednn`` (that one, and an error where it cannot run) or ``torch`` (never pack).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from infercept.model import cpu_kernels

CPU_LINEAR_ENV = "INFERCEPT_CPU_LINEAR"
_CHOICES = ("auto", "native", "onednn", "torch")


def _cpu_linear_choice() -> str:
    choice = os.environ.get(CPU_LINEAR_ENV, "auto")
    if choice not in _CHOICES:
        raise ValueError(f"${CPU_LINEAR_ENV}={choice!r} must be one of {', '.join(_CHOICES)}")
    return choice


def _has_onednn_linear() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def packing_for(weight: torch.Tensor) -> str | None:
    """Which packed path :meth:`Linear.pack` would take for ``weight`` under
    ``$INFERCEPT_CPU_LINEAR``: ``"native"``, ``"onednn"``, or None (``F.linear`` on the plain
    weight).

    Raises:
        RuntimeError: ``$INFERCEPT_CPU_LINEAR`` names a path that this weight, core or torch
            build cannot run.
    """
    choice = _cpu_linear_choice()
    fits = weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
    available = {"native": cpu_kernels.has_native_linear(), "onednn": _has_onednn_linear()}
    if choice in available and not (fits and available[choice]):
        needs = {"native": "infercept._core built with cpu_linear",
                 "onednn": "torch built with oneDNN"}[choice]
        raise RuntimeError(
            f"${CPU_LINEAR_ENV}={choice} but a {weight.dtype} weight on {weight.device} cannot "
            f"be packed (needs float32 on the CPU and {needs}: {available[choice]})")
    if choice == "torch" or not fits:
        return None
    if choice == "auto":
        return next((name for name, ok in available.items() if ok), None)
    return choice


def can_pack(weight: torch.Tensor) -> bool:
    """Whether :meth:`Linear.pack` would pack ``weight`` under ``$INFERCEPT_CPU_LINEAR``.

    Raises:
        RuntimeError: As :func:`packing_for`.
    """
    return packing_for(weight) is not None


class Linear(nn.Module):
    """``y = x W^T + b`` like ``nn.Linear`` (same parameter names, so HF weights load as is),
    with an optional packed weight (native or oneDNN layout).

    x: ``[T, in_features]`` (rows may be strided) -> ``[T, out_features]``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features), requires_grad=False)
                     if bias else None)
        self._packed: torch.Tensor | None = None  # the packed layout of weight
        self._packing: str | None = None  # "native" or "onednn" once packed

    @property
    def is_packed(self) -> bool:
        """Whether the GEMM runs on a packed copy (the plain weight is then gone)."""
        return self._packed is not None

    @property
    def packed_weight(self) -> torch.Tensor | None:
        """The packed copy of the weight (the native kernel's ``[ceil(N / 16), K, 16]`` or
        oneDNN's opaque layout), None until :meth:`pack`."""
        return self._packed

    @property
    def packing(self) -> str | None:
        """``"native"`` or ``"onednn"`` once packed, else None."""
        return self._packing

    def pack(self) -> bool:
        """Reorders the weight for the path :func:`packing_for` picks, dropping the plain one.

        Idempotent. Returns whether the layer is packed.
        """
        if self._packed is None:
            packing = packing_for(self.weight)
            if packing == "native":
                weight = self.weight.detach()
                if weight.stride(-1) != 1:
                    weight = weight.contiguous()
                self._packed = cpu_kernels.pack_linear_weight(weight)
            elif packing == "onednn":
                # batch_size=None: one layout for every row count (1-row decode to 512-row
                # prefill chunks measured within noise of a layout chosen for the exact count).
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
            if packing is not None:
                self._packing = packing
                self.weight = None  # type: ignore[assignment]  # the packed copy replaces it
        return self._packed is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packing == "native":
            if x.dim() != 2 or x.dtype != torch.float32 or x.stride(-1) != 1:
                # The kernel takes [T, K] float32 rows (any row stride); others are reshaped.
                shape = x.shape[:-1]
                x = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
                return cpu_kernels.cpu_linear(x, self._packed, self.out_features,
                                              self.bias).reshape(*shape, self.out_features)
            return cpu_kernels.cpu_linear(x, self._packed, self.out_features, self.bias)
        if self._packing == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, packed={self._packing or False}")
