"""The batched token sampler: temperature, top-k, top-p, one generator per request.

A request's random draws come from its own ``torch.Generator`` (CPU, seeded from
``SamplingParams.seed``), so what a seeded request samples never depends on which other
requests share its batch. The uniforms drawn are also the same on every device; the tokens can
differ across devices only where their softmax rounds differently.

No row is sorted over the whole vocabulary unless it must be. A row that keeps every token
(no top-k, top-p 1) samples by inverse CDF in token-id order. A row that truncates looks only
at its most probable tokens (``torch.topk``, 64 at first, more when its top-k or nucleus
reaches past them), ordered by probability with ties broken by token id.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from infercept.sampling import SamplingParams

# Candidates a truncating row looks at first; grown by _CANDIDATE_GROWTH until every row's cut
# falls inside them (a nucleus at top_p 0.95 is usually well under 64 tokens).
_FIRST_CANDIDATES = 64
_CANDIDATE_GROWTH = 8


def truncated_candidates(probs: torch.Tensor, top_k: torch.Tensor,
                         top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Applies top-k and top-p to full-vocabulary distributions, keeping only candidates.

    Args:
        probs: ``[S, V]`` float distributions in token-id order (rows sum to 1).
        top_k: ``[S]`` int64; values <= 0 or > V keep the whole vocabulary.
        top_p: ``[S]`` in (0, 1].

    Returns:
        ``(probs, token_ids)``, both ``[S, C]`` with ``C <= V``: row i's most probable tokens
        in descending order (ties by token id), renormalized over what top-k and top-p keep
        and zero past the cut. Every row's cut lies inside its C columns.
    """
    vocab_size = probs.shape[1]
    k = torch.where((top_k <= 0) | (top_k > vocab_size), vocab_size, top_k)  # [S]
    width = min(vocab_size, _FIRST_CANDIDATES)
    while width < vocab_size:
        values, token_ids = torch.topk(probs, width, dim=1)  # [S, width], descending
        # topk orders ties arbitrarily: order the candidates by id, then stably by value.
        by_id, order = torch.sort(token_ids, dim=1)
        values, by_value = torch.sort(values.gather(1, order), dim=1, descending=True,
                                      stable=True)
        token_ids = by_id.gather(1, by_value)
        keep = _kept(values, k, top_p)
        # The cut is exact when the last kept value is above the smallest candidate: every
        # token tied with it is then a candidate, so the order up to the cut (value, then id)
        # is the full sort's. Otherwise look at more candidates.
        last_kept = values.gather(1, keep.sum(dim=1, keepdim=True) - 1)  # [S, 1]
        if bool((last_kept > values[:, -1:]).all()):
            break
        width *= _CANDIDATE_GROWTH
    else:
        # A stable sort breaks ties by token id, so a row's order never depends on its
        # neighbours.
        values, token_ids = torch.sort(probs, dim=1, descending=True, stable=True)
        keep = _kept(values, k, top_p)
    values = torch.where(keep, values, torch.zeros_like(values))
    return values / values.sum(dim=1, keepdim=True), token_ids


def _kept(values: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """What top-k and top-p keep of descending rows. values: [S, C], k: [S] -> [S, C] bool."""
    positions = torch.arange(values.shape[1], device=values.device).expand_as(values)
    keep = positions < k.unsqueeze(1)
    # Nucleus: keep token j while the mass strictly before it is still below top_p, which is
    # the smallest prefix whose mass reaches top_p (the top token is always kept). top_p 1
    # keeps all: a float32 cumsum can reach 1 before the last token.
    mass_before = torch.cumsum(values, dim=1) - values
    keep &= (mass_before < top_p.unsqueeze(1)) | (top_p.unsqueeze(1) >= 1.0)
    keep[:, 0] = True
    return keep


def filter_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor) -> torch.Tensor:
    """The distribution each row samples from, in token-id order.

    Args:
        logits: ``[S, V]`` float logits.
        temperature: ``[S]`` positive temperatures.
        top_k: ``[S]`` int64; values <= 0 or > V keep the whole vocabulary.
        top_p: ``[S]`` in (0, 1].

    Returns:
        ``[S, V]``: softmax(logits / temperature) with top-k and top-p applied, renormalized.
    """
    probs = torch.softmax(logits.float() / temperature.unsqueeze(1), dim=1)  # [S, V]
    kept, token_ids = truncated_candidates(probs, top_k, top_p)
    return torch.zeros_like(probs).scatter_(1, token_ids, kept)


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Column of each row's first cdf entry above u * total. probs: [R, C], uniforms: [R, 1]."""
    cdf = torch.cumsum(probs, dim=1)  # [R, C]
    # The chosen column always has nonzero probability (a zero adds nothing to the cdf).
    columns = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True)  # [R, 1]
    return columns.clamp_(max=probs.shape[1] - 1).squeeze(1)


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
        # One uniform per sampled row from that request's own generator; the rest is batched.
        # uniforms: [S, 1]
        uniforms = torch.cat([
            torch.rand(1, generator=self._generator(request_ids[i], params[i].seed))
            for i in sampled_rows
        ]).to(device).unsqueeze(1)
        temperature = torch.tensor([params[i].temperature for i in sampled_rows],
                                   dtype=torch.float32, device=device)
        probs = torch.softmax(logits[sampled_rows].float() / temperature.unsqueeze(1), dim=1)
        truncates = [_truncates(params[i]) for i in sampled_rows]
        whole = [j for j, t in enumerate(truncates) if not t]
        if whole:
            # Every token kept: inverse CDF straight over the vocabulary, in id order.
            picked = _inverse_cdf(probs[whole], uniforms[whole])
            tokens[[sampled_rows[j] for j in whole]] = picked
        cut = [j for j, t in enumerate(truncates) if t]
        if cut:
            kept, token_ids = truncated_candidates(
                probs[cut],
                torch.tensor([params[sampled_rows[j]].top_k for j in cut], dtype=torch.int64,
                             device=device),
                torch.tensor([params[sampled_rows[j]].top_p for j in cut], dtype=torch.float32,
                             device=device),
            )
            columns = _inverse_cdf(kept, uniforms[cut])  # [len(cut)]
            tokens[[sampled_rows[j] for j in cut]] = token_ids.gather(
                1, columns.unsqueeze(1)).squeeze(1)
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


def _truncates(params: SamplingParams) -> bool:
    """Whether top-k or top-p can cut this request's distribution."""
    return params.top_k > 0 or params.top_p < 1.0
