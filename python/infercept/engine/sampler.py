"""The batched token sampler: temperature, top-k, top-p, one generator per request.

A request's random draws come from its own ``torch.Generator`` (CPU, seeded from
``SamplingParams.seed``), so what a seeded request samples never depends on which other
requests share its batch. The uniforms drawn are also the same on every device; the tokens can
differ across devices only where their softmax rounds differently.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from infercept.sampling import SamplingParams


def filter_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Applies temperature, top-k and top-p, returning the filtered distribution, sorted.

    Args:
        logits: ``[S, V]`` float logits of the sampled (non-greedy) rows.
        temperature: ``[S]`` positive temperatures.
        top_k: ``[S]`` int64; values <= 0 or >= V keep the whole vocabulary.
        top_p: ``[S]`` in (0, 1].

    Returns:
        ``(probs, token_ids)``, both ``[S, V]``: ``probs[i]`` is row i's renormalized
        distribution in descending order (zeros past the cut), ``token_ids[i, j]`` the token of
        ``probs[i, j]``.
    """
    num_rows, vocab_size = logits.shape
    scaled = logits.float() / temperature.unsqueeze(1)  # [S, V]
    # A stable sort breaks ties by token id, so a row's order never depends on its neighbours.
    sorted_logits, token_ids = torch.sort(scaled, dim=1, descending=True, stable=True)
    probs = torch.softmax(sorted_logits, dim=1)  # [S, V]
    positions = torch.arange(vocab_size, device=logits.device).expand(num_rows, vocab_size)
    k = torch.where((top_k <= 0) | (top_k > vocab_size), vocab_size, top_k)  # [S]
    keep = positions < k.unsqueeze(1)  # [S, V]
    # Nucleus: keep token j while the mass strictly before it is still below top_p, which is
    # the smallest prefix whose mass reaches top_p (the top token is always kept).
    mass_before = torch.cumsum(probs, dim=1) - probs  # [S, V]
    keep &= mass_before < top_p.unsqueeze(1)
    keep[:, 0] = True
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    return probs / probs.sum(dim=1, keepdim=True), token_ids


class Sampler:
    """Samples one token per row, each request drawing from its own generator.

    Generators are created on a request's first sampled step and kept until ``release``, so a
    seeded request's sequence of draws is reproducible whatever else is in the batch.
    """

    def __init__(self) -> None:
        self._generators: dict[Hashable, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, request_ids: Sequence[Hashable],
               params: Sequence[SamplingParams]) -> torch.Tensor:
        """Samples the next token of every row.

        Args:
            logits: ``[B, V]`` float logits, one row per request.
            request_ids: ``B`` ids, each naming the generator of its row.
            params: ``B`` sampling parameters, one per row.

        Returns:
            ``[B]`` int64 token ids on the logits' device.

        Raises:
            ValueError: The shapes disagree.
        """
        if logits.dim() != 2:
            raise ValueError(f"logits must be [B, vocab], got shape {tuple(logits.shape)}")
        num_rows = logits.shape[0]
        if len(request_ids) != num_rows or len(params) != num_rows:
            raise ValueError(
                f"logits has {num_rows} rows but got {len(request_ids)} request ids and "
                f"{len(params)} params"
            )
        tokens = torch.argmax(logits, dim=1)  # [B]
        sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if not sampled_rows:
            return tokens
        device = logits.device
        rows = torch.tensor(sampled_rows, device=device)  # [S]
        probs, token_ids = filter_probs(
            logits[rows],
            torch.tensor([params[i].temperature for i in sampled_rows], dtype=torch.float32,
                         device=device),
            torch.tensor([params[i].top_k for i in sampled_rows], dtype=torch.int64,
                         device=device),
            torch.tensor([params[i].top_p for i in sampled_rows], dtype=torch.float32,
                         device=device),
        )
        # One uniform per sampled row from that request's own generator; the rest is batched
        # inverse-CDF sampling. uniforms: [S, 1]
        uniforms = torch.cat([
            torch.rand(1, generator=self._generator(request_ids[i], params[i].seed))
            for i in sampled_rows
        ]).to(device).unsqueeze(1)
        cdf = torch.cumsum(probs, dim=1)  # [S, V]
        # First position whose cdf exceeds u * total; it always has nonzero probability.
        positions = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True)  # [S, 1]
        positions.clamp_(max=probs.shape[1] - 1)
        tokens[rows] = token_ids.gather(1, positions).squeeze(1)
        return tokens

    def release(self, request_id: Hashable) -> None:
        """Forgets a finished or aborted request's generator (no-op if it has none)."""
        self._generators.pop(request_id, None)

    @property
    def num_generators(self) -> int:
        """Number of requests whose generator is held."""
        return len(self._generators)

    def _generator(self, request_id: Hashable, seed: int | None) -> torch.Generator:
        generator = self._generators.get(request_id)
        if generator is None:
            generator = torch.Generator()
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
            self._generators[request_id] = generator
        return generator
