"""The optimizer of the training loop: AdamW with decoupled weight decay on matrices only."""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError
from .config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The decay / no-decay split: trainable parameters of two or more dimensions (weight matrices,
    embeddings) get ``weight_decay``, the others (biases, norm scales) none. Empty groups are left out;
    raises ``InvalidArgumentError`` when nothing is trainable."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise InvalidArgumentError("the model has no trainable parameters")
    return groups


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` with ``cfg``'s lr, betas and eps; the fused kernel where it runs."""
    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    # the fused kernel is several times faster than the per-tensor loop (CPU included)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
