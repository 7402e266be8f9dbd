"""Per-step cost of the sampling surface over a batch: penalties, logit_bias, min_tokens and
logprobs (``engine/logits_processors.py``) against plain sampling, on random logits of the
embedded model's vocabulary (49152). No model: only the processing between forward and draw.

    python benchmarks/bench_logits_processors.py --batch 1 32 --steps 200
    python benchmarks/bench_logits_processors.py --device cuda   # on a GPU

Prints, per batch size, microseconds per step for: sampling alone (temperature 0.8, seeded);
with top-k 50; with top-p 0.95; + every request penalized (presence, frequency, repetition);
+ logit_bias (16 ids each) and min_tokens; + logprobs (top 5). The logits are N(0, std^2)
(`--logit-std`, default 1): std 1 is nearly flat over 49152 tokens, so top-p 0.95 keeps most of
the vocabulary (the sampler's worst case, a full sort); a language model's next-token
distribution is far more peaked (std 4 keeps a nucleus of tens to hundreds of tokens). The
nucleus size is printed.
"""

from __future__ import annotations

import argparse
import time

import torch

from infercept.engine.logits_processors import LogitsProcessors
from infercept.engine.sampler import Sampler
from infercept.sampling import SamplingParams

VOCAB = 49152

CASES = {
    "plain": SamplingParams(temperature=0.8, seed=0),
    "top-k 50": SamplingParams(temperature=0.8, seed=0, top_k=50),
    "top-p 0.95": SamplingParams(temperature=0.8, seed=0, top_p=0.95),
    "penalties": SamplingParams(temperature=0.8, seed=0, presence_penalty=0.5,
                                frequency_penalty=0.5, repetition_penalty=1.1),
    "+bias+min_tokens": SamplingParams(temperature=0.8, seed=0, presence_penalty=0.5,
                                       frequency_penalty=0.5, repetition_penalty=1.1,
                                       logit_bias={i: 1.0 for i in range(16)}, min_tokens=10**6,
                                       max_tokens=10**6),
    "+logprobs(5)": SamplingParams(temperature=0.8, seed=0, presence_penalty=0.5,
                                   frequency_penalty=0.5, repetition_penalty=1.1,
                                   logit_bias={i: 1.0 for i in range(16)}, logprobs=5),
}


def time_case(params: SamplingParams, batch: int, steps: int, device: torch.device,
              logit_std: float) -> float:
    processors = LogitsProcessors(VOCAB, [2], device)
    sampler = Sampler()
    ids = list(range(batch))
    for request_id in ids:
        processors.add(request_id, params, list(range(200)))
    logits = torch.randn(batch, VOCAB, device=device) * logit_std
    for warm in (True, False):
        start = time.perf_counter()
        for _ in range(5 if warm else steps):
            step_logits = logits.clone()
            processors.apply(step_logits, ids)
            tokens = sampler.sample(step_logits, ids, [params] * batch).tolist()
            processors.logprobs(step_logits, ids, tokens)
            processors.accept(ids, tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--logit-std", type=float, default=1.0)
    args = parser.parse_args()
    device = torch.device(args.device)
    probs = torch.softmax(torch.randn(64, VOCAB) * args.logit_std / 0.8, dim=1)
    sorted_probs = probs.sort(dim=1, descending=True).values
    nucleus = (sorted_probs.cumsum(dim=1) - sorted_probs < 0.95).sum(dim=1).float()
    print(f"logit std {args.logit_std}: top-p 0.95 keeps {nucleus.mean():.0f} tokens on average")
    print(f"{'batch':>5} " + " ".join(f"{name:>18}" for name in CASES) + "   (us per step)")
    for batch in args.batch:
        row = [time_case(params, batch, args.steps, device, args.logit_std)
               for params in CASES.values()]
        print(f"{batch:>5} " + " ".join(f"{us:>18.0f}" for us in row))


if __name__ == "__main__":
    main()
