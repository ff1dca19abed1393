"""Benchmarks (they use the library; the library never imports them).

* :mod:`attnprune.bench.kernels`: attention kernels side by side (SDPA cuDNN / flash, FlexAttention,
  ``sparse_attention``) on random block layouts; ``attnprune bench``.
* :mod:`attnprune.bench.model`: a whole model, prefill and a training step, dense versus synthetic
  masks; ``attnprune bench --model NAME``.
* :mod:`attnprune.bench.syncs`: counting a function's GPU->CPU synchronisations.
"""
