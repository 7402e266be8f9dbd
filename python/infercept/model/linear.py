"""Linear layers whose float32 CPU weights are prepacked once for oneDNN, as vLLM's CPU backend
does with its oneDNN GEMM handles.

``F.linear`` on the CPU runs MKL's sgemm on the weight as stored, every step. oneDNN (bundled in
torch's CPU build) can instead reorder a weight once into its blocked layout and run each
step's GEMM on that: on the 2-core AVX2 EPYC of benchmarks/results/decode.md, SmolLM2's 30
layers of fused projections took 68 instead of 101 ms at 32 rows and 24 instead of 31 ms at one
row, and the 49152 x 576 LM head 17 instead of 35 ms at 32 rows. Results differ from MKL's only
by float rounding (~1e-5 relative).

Packing is a step after loading (:meth:`Linear.pack`, called by
``LlamaForCausalLM.process_weights_after_loading`` once the model is on its device): the plain
weight is then dropped, so the packed copy replaces it instead of doubling memory.
``$INFERCEPT_CPU_LINEAR`` chooses: ``auto`` (default: oneDNN for float32 CPU weights when torch
has it), ``onednn`` (the same, but an error where it cannot run) or ``torch`` (never pack).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

CPU_LINEAR_ENV = "INFERCEPT_CPU_LINEAR"
_CHOICES = ("auto", "onednn", "torch")


def _cpu_linear_choice() -> str:
    choice = os.environ.get(CPU_LINEAR_ENV, "auto")
    if choice not in _CHOICES:
        raise ValueError(f"${CPU_LINEAR_ENV}={choice!r} must be one of {', '.join(_CHOICES)}")
    return choice


def _has_onednn_linear() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def can_pack(weight: torch.Tensor) -> bool:
    """Whether :meth:`Linear.pack` would pack ``weight`` under ``$INFERCEPT_CPU_LINEAR``.

    Raises:
        RuntimeError: ``$INFERCEPT_CPU_LINEAR=onednn`` but this weight or torch build cannot.
    """
    choice = _cpu_linear_choice()
    fits = weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
    if choice == "onednn" and not (fits and _has_onednn_linear()):
        raise RuntimeError(
            f"${CPU_LINEAR_ENV}=onednn but a {weight.dtype} weight on {weight.device} cannot be "
            f"packed (needs float32 on the CPU and torch built with oneDNN: "
            f"{torch.backends.mkldnn.is_available()})")
    return choice != "torch" and fits and _has_onednn_linear()


class Linear(nn.Module):
    """``y = x W^T + b`` like ``nn.Linear`` (same parameter names, so HF weights load as is),
    with an optional oneDNN-packed weight.

    x: ``[T, in_features]`` (rows may be strided) -> ``[T, out_features]``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features), requires_grad=False)
                     if bias else None)
        self._packed: torch.Tensor | None = None  # oneDNN's opaque layout of weight

    @property
    def is_packed(self) -> bool:
        """Whether the GEMM runs on a packed copy (the plain weight is then gone)."""
        return self._packed is not None

    def pack(self) -> bool:
        """Reorders the weight for oneDNN where :func:`can_pack` allows, dropping the plain one.

        Idempotent. Returns whether the layer is packed.
        """
        if self._packed is None and can_pack(self.weight):
            # batch_size=None: one layout for every row count (1-row decode to 512-row prefill
            # chunks measured within noise of a layout chosen for the exact count).
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
            self.weight = None  # type: ignore[assignment]  # the packed copy replaces it
        return self._packed is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, packed={self.is_packed}")
