"""Grammar-constrained decoding: one llguidance matcher per structured request, and its masks.

Each step, before the forward starts, the engine hands the ids of the rows about to sample to
``begin_masks``; the masks of those with a matcher are computed on a helper thread (llguidance
drops the GIL and spreads the batch over its own threads) while the model runs, and ``apply``
waits for them and sets every disallowed logit to -inf. So the mask cost hides behind the
forward unless it is longer than the forward (``mask_wait_s`` measures what showed).

A matcher's state is the tokens it accepted: the engine feeds it each sampled token
(``accept``) and never the tool output spliced in at a pause, so a pause leaves the state
where the model stopped. What happens at the resume is the engine's rule (LLMEngine.resume,
docs/structured_outputs.md).

Shapes: a bitmask is ``[R, ceil(V / 32)]`` int32 on the CPU, bit ``t % 32`` of word
``t // 32`` set when token ``t`` is allowed; logits are ``[B, V]``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from infercept.model import Tokenizer
from infercept.structured_output import StructuredOutput


@dataclass
class PendingMasks:
    """Masks being computed for one step.

    Attributes:
        rows: Row indices (into the step's logits) that have a matcher.
        request_ids: Their requests, in the same order.
        bitmask: ``[len(rows), words]`` int32, filled by ``future``.
        future: Done when ``bitmask`` is filled.
    """

    rows: list[int]
    request_ids: list[int]
    bitmask: torch.Tensor
    future: Future[float]


class GrammarMatchers:
    """The matchers of the engine's structured requests.

    Args:
        tokenizer: The engine's tokenizer (an HF fast tokenizer underneath).
        vocab_size: Width of the model's logits (may exceed the tokenizer's vocabulary).
        num_threads: llguidance's worker threads for a batch of masks (None: its default).

    The llguidance tokenizer (about a second to build) and the threads start with the first
    structured request, so an engine that never sees one pays nothing.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int,
                 num_threads: int | None = None) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._num_threads = num_threads
        self._matchers: dict[int, object] = {}
        self._lock = threading.Lock()  # guards the lazy start
        self._ll_tokenizer: object | None = None
        self._executor: object | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._shifts = torch.arange(32, dtype=torch.int32)
        self.num_masks = 0        # masks computed
        self.mask_compute_s = 0.0  # helper-thread time spent computing them
        self.mask_wait_s = 0.0    # engine-thread time spent waiting for them after the forward

    # ---- requests --------------------------------------------------------------------------

    def build(self, structured_output: StructuredOutput) -> object:
        """A fresh matcher for ``structured_output``, not yet attached to a request.

        Raises:
            ValueError: llguidance rejects the grammar for this tokenizer.
        """
        import llguidance

        matcher = llguidance.LLMatcher(self._llguidance_tokenizer(), structured_output.compiled,
                                       log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured output {structured_output.kind} is rejected by the "
                             f"grammar compiler: {matcher.get_error()}")
        return matcher

    def attach(self, request_id: int, matcher: object) -> None:
        """Makes ``matcher`` (from ``build``) the request's, replacing any it had."""
        self._matchers[request_id] = matcher

    def has(self, request_id: int) -> bool:
        return request_id in self._matchers

    def __len__(self) -> int:
        return len(self._matchers)

    def accept(self, request_id: int, token_id: int) -> str | None:
        """Advances a request's matcher by a sampled token; returns an error message or None.

        A no-op for a request without a matcher.
        """
        matcher = self._matchers.get(request_id)
        if matcher is None or matcher.consume_token(token_id):  # type: ignore[attr-defined]
            return None
        error = matcher.get_error()  # type: ignore[attr-defined]
        return f"sampled token {token_id} violates the structured output: {error}"

    def replace_last(self, request_id: int, token_ids: Sequence[int]) -> None:
        """Undoes the last accepted token and accepts its re-tokenization instead."""
        matcher = self._matchers.get(request_id)
        if matcher is None:
            return
        matcher.rollback(1)  # type: ignore[attr-defined]
        matcher.consume_tokens(list(token_ids))  # type: ignore[attr-defined]

    def is_complete(self, request_id: int) -> bool:
        """Whether the grammar has ended: nothing but end-of-sequence may follow."""
        matcher = self._matchers.get(request_id)
        return matcher is not None and matcher.is_stopped()  # type: ignore[attr-defined]

    def release(self, request_id: int) -> None:
        """Forgets a request's matcher (no-op without one)."""
        self._matchers.pop(request_id, None)

    # ---- masks -----------------------------------------------------------------------------

    def begin_masks(self, request_ids: Sequence[int]) -> PendingMasks | None:
        """Starts computing the masks of the rows about to sample; None if none is structured.

        Args:
            request_ids: The step's sampling rows in logits order.
        """
        rows = [i for i, r in enumerate(request_ids) if r in self._matchers]
        if not rows:
            return None
        ids = [request_ids[i] for i in rows]
        num_words = (self.vocab_size + 31) // 32
        bitmask = torch.full((len(rows), num_words), -1, dtype=torch.int32)
        pairs = [(self._matchers[r], k) for k, r in enumerate(ids)]
        executor = self._executor

        def fill() -> float:
            # llguidance.torch's fill_next_token_bitmask_par, without importing that module
            # (it runs torch.compile at import). Row k of ``bitmask`` gets pairs[k]'s mask.
            start_s = time.perf_counter()
            executor.unsafe_compute_mask_ptr(  # type: ignore[attr-defined]
                pairs, bitmask.data_ptr(), num_words * 4, len(pairs))
            return time.perf_counter() - start_s

        assert self._thread is not None  # started with the first matcher
        return PendingMasks(rows, ids, bitmask, self._thread.submit(fill))

    def apply(self, pending: PendingMasks, logits: torch.Tensor) -> None:
        """Waits for the masks and sets the disallowed logits of their rows to -inf, in place.

        Args:
            pending: From ``begin_masks`` for this step.
            logits: ``[B, V]`` float logits of the step's sampling rows.
        """
        start_s = time.perf_counter()
        self.mask_compute_s += pending.future.result()
        self.mask_wait_s += time.perf_counter() - start_s
        self.num_masks += len(pending.rows)
        num_rows, vocab = len(pending.rows), logits.shape[1]
        bitmask = pending.bitmask.to(logits.device)
        # [R, W, 32] bits -> [R, W * 32] allowed flags, cut to the logits' width.
        allowed = ((bitmask.unsqueeze(-1) >> self._shifts.to(logits.device)) & 1).bool()
        allowed = allowed.view(num_rows, -1)[:, :vocab]
        rows = torch.tensor(pending.rows, dtype=torch.int64, device=logits.device)
        with torch.inference_mode():  # the runner's logits are inference tensors
            logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))

    def close(self) -> None:
        """Stops the helper thread."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None

    # ---- lazy start ------------------------------------------------------------------------

    def _llguidance_tokenizer(self) -> object:
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance
                import llguidance.hf

                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self._tokenizer.hf_tokenizer, n_vocab=self.vocab_size,
                    eos_token=self._tokenizer.eos_token_id)
                self._executor = llguidance.LLExecutor(num_threads=self._num_threads)
                self._thread = ThreadPoolExecutor(max_workers=1,
                                                  thread_name_prefix="infercept-grammar")
            return self._ll_tokenizer
