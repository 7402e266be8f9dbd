"""The engine's configuration: model, policy, KV pool sizes, batching limits, tool handling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infercept.policy_names import canonical_policy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    """How an engine is built.

    Attributes:
        model: A ``.gguf`` file, an HF model directory, or None for the embedded SmolLM2.
        policy: What happens to a paused request's KV: 'infercept' (min-waste, per request and
            per iteration), the paper's baselines 'vllm-0.2', 'discard', 'preserve', 'swap', or
            today's 'vllm-v1', 'vllm-v1-offload', 'continuum' (docs/baselines.md). 'vllm' is
            a deprecated alias of 'vllm-0.2'.
        dtype: Weights and KV cache: 'float32' (default on CPU), 'bfloat16' or 'float16'.
        block_size: Tokens per KV block.
        kv_cache_bytes: Device KV pool size, when ``num_device_blocks`` is not given.
        num_device_blocks: Device KV pool size in blocks (overrides ``kv_cache_bytes``).
        num_host_blocks: Host (swap) pool size in blocks; None: twice the device pool.
        max_batched_tokens: Tokens per iteration S (decodes and prefill/recompute chunks).
        max_running_requests: Requests in one batch at most.
        max_model_len: Longest context; None: the model's ``max_position_embeddings``.
        tool_response_format: How a tool's output is spliced into the context; ``{output}`` is
            replaced by the tool's text.
        cost_profile: The cost model the scheduler sizes swaps and waste by: None measures one
            on this machine at start-up (cached per model, dtype and machine), else a JSON
            profile path or a built-in profile name.
        check_invariants: Check block conservation after every step (tests; slower).
        enable_prefix_caching: Keep full KV blocks findable by content after their requests
            let go, so a later request with the same prefix (system prompt, earlier turns)
            reuses them instead of prefilling again. Ignored (off) under 'vllm-0.2', which had
            no prefix cache.
        device: Where the model and the KV cache live: 'auto' (CUDA when compiled and a
            device is present, else CPU with a logged message), 'cpu', 'cuda' or 'cuda:N' (an
            error when CUDA cannot run); see :func:`infercept.backend.select_device`.
        tensor_parallel_size: N ranks, each holding 1/N of the attention heads (by KV-head
            groups) and of the MLP, and its own KV cache and host pool shards
            (docs/tensor_parallel.md); N must divide the KV heads, and on CUDA N devices from
            ``device`` on must be visible. ``kv_cache_bytes`` is then per rank.
        tensor_parallel_timeout_s: How long a collective may wait for the other ranks before
            the engine fails (a worker that hangs; one that dies is seen at once).
        rank_s_per_predicted_token: Rank the waiting queue (and who is preempted first) by
            predicted remaining output, LAMPS-style: a request's FCFS key plus this many
            seconds per predicted token (``add_request(predicted_output_tokens=...)``), so
            short work goes first and long work is delayed by at most its own term. 0: FCFS,
            the paper's order. Requests without a prediction keep their FCFS key.
        learn_output_lengths: With ranking on, a request the caller gave no prediction for
            its current turn is ranked by the core's own: the mean of what finished programs
            of its class (the hash of its prompt's first 8 blocks: programs of one app share
            it) generated from the same turn on, learned online (docs/baselines.md).
    """

    model: str | None = None
    policy: str = "infercept"
    dtype: str = "float32"
    block_size: int = 16
    kv_cache_bytes: int = 512 * 2**20
    num_device_blocks: int | None = None
    num_host_blocks: int | None = None
    max_batched_tokens: int = 512
    max_running_requests: int = 64
    max_model_len: int | None = None
    tool_response_format: str = "<tool_response>{output}</tool_response>"
    cost_profile: str | None = None
    check_invariants: bool = False
    device: str = "auto"
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    tensor_parallel_timeout_s: float = 120.0
    rank_s_per_predicted_token: float = 0.0
    learn_output_lengths: bool = False

    def __post_init__(self) -> None:
        self.policy = canonical_policy(self.policy)  # ValueError naming the policy and the choices
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {sorted(DTYPES)}")
        for name in ("block_size", "kv_cache_bytes", "max_batched_tokens", "max_running_requests"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive int")
        for name in ("num_device_blocks", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name}={value!r} must be a positive int or None")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size!r} must be a "
                             "positive int")
        if not self.tensor_parallel_timeout_s > 0:
            raise ValueError(f"tensor_parallel_timeout_s={self.tensor_parallel_timeout_s!r} "
                             "must be > 0")
        if not (isinstance(self.rank_s_per_predicted_token, (int, float))
                and 0 <= self.rank_s_per_predicted_token < float("inf")):
            raise ValueError(f"rank_s_per_predicted_token={self.rank_s_per_predicted_token!r} "
                             "must be a finite number >= 0")
        if not isinstance(self.learn_output_lengths, bool):
            raise ValueError(f"learn_output_lengths={self.learn_output_lengths!r} must be a bool")
        if self.learn_output_lengths and self.rank_s_per_predicted_token == 0:
            raise ValueError("learn_output_lengths=True needs rank_s_per_predicted_token > 0: "
                             "at 0 the queue is FCFS and a prediction ranks nothing")
        if self.num_host_blocks is not None and self.num_host_blocks < 0:
            raise ValueError(f"num_host_blocks={self.num_host_blocks} must be >= 0 or None")
        if not isinstance(self.device, str) or not (
                self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device={self.device!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if "{output}" not in self.tool_response_format:
            raise ValueError(f"tool_response_format={self.tool_response_format!r} must contain "
                             "'{output}'")

    def pool_sizes(self, kv_bytes_per_token: int) -> tuple[int, int]:
        """(device, host) KV pool sizes in blocks for a cache of ``kv_bytes_per_token``.

        Raises:
            ValueError: ``kv_cache_bytes`` holds no block.
        """
        block_bytes = kv_bytes_per_token * self.block_size
        num_device_blocks = self.num_device_blocks or self.kv_cache_bytes // block_bytes
        if num_device_blocks < 1:
            raise ValueError(f"kv_cache_bytes={self.kv_cache_bytes} holds no block of "
                             f"{block_bytes} bytes")
        num_host_blocks = (2 * num_device_blocks if self.num_host_blocks is None
                           else self.num_host_blocks)
        return num_device_blocks, num_host_blocks

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a torch dtype."""
        return DTYPES[self.dtype]
