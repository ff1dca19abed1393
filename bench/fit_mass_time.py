"""Time of ``LengthFree.fit_mass`` per site (the stats-fitted length-free form, ``hold="mass"``).

    PYTHONPATH=src python3 bench/fit_mass_time.py [reps]

Random score tensors shaped like one SmolLM2 site (9 heads): 512 calibration tokens at token level
(``R = C = 512``) and 2048 tokens with 64-blocks (``R = C = 32``), each for a causal and a
bidirectional (``self``) site. Rows are a softmax over random logits pulled towards the diagonal and
the first key (causal: over ``c <= r``), so each row sums to 1 like attention probabilities (times
the block size on the block grid: a block row holds ``b`` query rows); the mass to keep is one share
per head in 0.80 .. 0.99. Printed: the median wall time of one fit over ``reps`` runs (default 5),
and the 30 sites of SmolLM2 at that rate.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402

from attnprune.lengthfree import LengthFree  # noqa: E402

SITES = 30  # SmolLM2-135M: 30 layers, one self-attention site each
HEADS = 9


def scores(n: int, kind: str, unit: int = 1, seed: int = 0) -> torch.Tensor:
    """float64 ``[HEADS, n, n]``: attention-like rows on an ``n x n`` grid (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    r, c = torch.arange(n)[:, None], torch.arange(n)[None, :]
    logits = 2 * torch.randn(HEADS, n, n, generator=g, dtype=torch.float64) - 0.05 * (r - c).abs() + 4.0 * (c == 0)
    if kind == "causal":
        logits = logits.masked_fill(c > r, float("-inf"))
    return logits.softmax(-1) * unit


def time_fit(cls, score: torch.Tensor, kind: str, mass: torch.Tensor, reps: int) -> float:
    """Median seconds of ``cls.fit_mass(score, kind, mass)`` over ``reps`` runs (after one warm-up)."""
    cls.fit_mass(score, kind, mass)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        cls.fit_mass(score, kind, mass)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(cls=LengthFree, reps: int = 5) -> None:
    mass = torch.linspace(0.80, 0.99, HEADS, dtype=torch.float64)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {reps}")
    for label, n, unit in (("512 tokens, token grid", 512, 1), ("2048 tokens, 64-blocks", 32, 64)):
        for kind in ("causal", "self"):
            t = time_fit(cls, scores(n, kind, unit), kind, mass, reps)
            print(f"{label:24s} H={HEADS} R=C={n:<4d} {kind:6s}: {t:8.4f} s per site, "
                  f"{SITES * t:8.2f} s for {SITES} sites")


if __name__ == "__main__":
    main(reps=int(sys.argv[1]) if len(sys.argv) > 1 else 5)
