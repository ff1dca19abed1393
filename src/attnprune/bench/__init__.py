"""Benchmarks (they use the library; the library never imports them).

* :mod:`attnprune.bench.kernels`: attention kernels side by side (SDPA cuDNN / flash, FlexAttention,
  ``sparse_attention``) on random block layouts; ``attnprune bench``.
* :mod:`attnprune.bench.model`: a whole model, prefill and a training step, dense versus synthetic
  (or real, ``--masks``) masks; ``attnprune bench --model NAME``.
* :mod:`attnprune.bench.decode`: generation, dense versus masked with the stock cache versus
  ``PrunedKVCache``; ``attnprune bench --model NAME --model-modes decode``.
* :mod:`attnprune.bench.syncs`: counting a function's GPU->CPU synchronisations.
"""
