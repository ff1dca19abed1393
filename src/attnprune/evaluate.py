"""Quality metrics.

* ``perplexity(model, batches)``: causal language models. Token-weighted: the negative
  log-likelihood is summed over every predicted token of every sequence and divided by the number
  of predicted tokens (not averaged per batch), so batches of different sizes and padding do not
  bias it. A token ``t`` is predicted from position ``t - 1``; it counts only when both positions are
  real tokens (``attention_mask`` is 1) and its label is not ``-100``.
* ``accuracy(model, batches)``: classifiers whose output is ``logits: [batch, classes]``.
* ``train_classifier(encoder, batches)``: a linear head on mean-pooled encoder states (the encoder
  frozen, or fine-tuned with ``finetune=True``), for encoders without a task head (MiniLM).

The quality-versus-sparsity sweep over these metrics is an experiment: ``attnprune.experiments.sweep_loop``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import EmptyDatasetError, InvalidArgumentError

# the metric of each task, and which way is better (the sweep and its report read them)
TASK_METRICS = {"causal-lm": "perplexity", "classification": "accuracy"}
HIGHER_IS_BETTER = {"perplexity": False, "accuracy": True}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def progress_bar(it: Iterable, progress: bool, desc: str, total: int | None = None) -> Iterable:
    """``it`` under a tqdm bar when ``progress`` (``it`` itself otherwise)."""
    if not progress:
        return it
    from tqdm.auto import tqdm

    if total is None:
        try:
            total = len(it)  # type: ignore[arg-type]
        except TypeError:
            total = None
    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)


def model_inputs(batch: Any, drop: Sequence[str] = ("labels",)) -> dict:
    """A batch (dict of model keyword arguments, or a tensor of input ids) as keyword arguments."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k not in drop}
    raise InvalidArgumentError(
        f"a batch must be a dict of model keyword arguments or a tensor of input ids, got {type(batch).__name__}")


def _logits(out: Any) -> torch.Tensor:
    """The logits of a model output (a ``ModelOutput`` with ``.logits``, a tuple, or a tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise InvalidArgumentError(f"cannot find logits in the model output ({type(out).__name__})")


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------

@dataclass
class MetricResult:
    """One measurement. ``value`` is the metric (perplexity or accuracy);
    ``nll`` the mean negative log-likelihood per token (perplexity only); ``count`` the number of
    predicted tokens or classified examples; ``correct`` (accuracy only)."""

    metric: str
    value: float
    count: int
    nll: float | None = None
    correct: int | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              labels: torch.Tensor | None = None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of one batch.

    logits: [batch, seq, vocab]; input_ids: [batch, seq]; attention_mask: [batch, seq] (1 = real
    token) or None; labels: [batch, seq] (``-100`` = ignore; defaults to ``input_ids``).
    Position ``t`` predicts token ``t + 1``; the pair counts when both positions are real tokens
    and the label is not ``-100``. Returns ``(nll_sum, predicted_tokens)``: each token's NLL in the
    logits' precision (float32 or float64), the sum in float64.
    """
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise InvalidArgumentError(
            f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)} (want [batch, seq, vocab])")
    target = (labels if labels is not None else input_ids)[:, 1:]
    valid = target != -100
    if attention_mask is not None:
        am = attention_mask.bool()
        valid = valid & am[:, 1:] & am[:, :-1]
    n = int(valid.sum())
    if n == 0:
        return 0.0, 0
    lg = logits[:, :-1]                                            # [batch, seq-1, vocab], a view
    dt = torch.float64 if lg.dtype == torch.float64 else torch.float32
    lse = torch.logsumexp(lg.to(dt), dim=-1)                       # [batch, seq-1]
    picked = lg.gather(-1, target.clamp_min(0).long().unsqueeze(-1)).squeeze(-1).to(dt)
    nll = (lse - picked)[valid].double().sum()                     # per-token in float32, summed in float64
    return float(nll), n


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable, *, progress: bool = True, desc: str = "perplexity") -> MetricResult:
    """Token-weighted perplexity of a causal LM: ``exp(sum of NLL / number of predicted tokens)``.

    batches: dicts with ``input_ids: [batch, seq]`` and optionally ``attention_mask: [batch, seq]``
    and ``labels: [batch, seq]`` (``-100`` ignored), or tensors of input ids ``[batch, seq]``.
    The model must return logits ``[batch, seq, vocab]`` (or an output with ``.logits``).
    Raises ``EmptyDatasetError`` when no token is predicted.
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)
    t0 = time.perf_counter()
    total, n = 0.0, 0
    try:
        for batch in progress_bar(batches, progress, desc):
            kw = _to(model_inputs(batch, drop=("labels",)), device)
            labels = batch.get("labels") if isinstance(batch, Mapping) else None
            logits = _logits(model(**kw))
            s, c = token_nll(logits, kw["input_ids"], kw.get("attention_mask"),
                             labels.to(device) if labels is not None else None)
            total += s
            n += c
    finally:
        model.train(was_training)
    if n == 0:
        raise EmptyDatasetError("perplexity: the batches held no predicted token (empty data, or all padding)")
    nll = total / n
    return MetricResult("perplexity", math.exp(nll), n, nll=nll, seconds=time.perf_counter() - t0)


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable, *, progress: bool = True, desc: str = "accuracy") -> MetricResult:
    """Classification accuracy: the share of examples whose highest logit is their label.

    batches: dicts of model keyword arguments plus ``labels: [batch]`` (int class ids; ``-100``
    ignored). The model must return logits ``[batch, classes]`` (or an output with ``.logits``).
    Raises ``EmptyDatasetError`` when no example is labelled.
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)
    t0 = time.perf_counter()
    correct, n = 0, 0
    try:
        for batch in progress_bar(batches, progress, desc):
            if not isinstance(batch, Mapping) or "labels" not in batch:
                raise InvalidArgumentError("accuracy: every batch must be a dict with 'labels'")
            labels = batch["labels"].to(device).long().view(-1)
            logits = _logits(model(**_to(model_inputs(batch), device)))
            if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
                raise InvalidArgumentError(
                    f"accuracy: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)} "
                    "(want [batch, classes])")
            ok = labels != -100
            correct += int((logits.argmax(-1)[ok] == labels[ok]).sum())
            n += int(ok.sum())
    finally:
        model.train(was_training)
    if n == 0:
        raise EmptyDatasetError("accuracy: the batches held no labelled example")
    return MetricResult("accuracy", correct / n, n, correct=correct, seconds=time.perf_counter() - t0)


METRICS: dict[str, Callable[..., MetricResult]] = {"perplexity": perplexity, "accuracy": accuracy}


# --------------------------------------------------------------------------------------------
# classification head for encoders
# --------------------------------------------------------------------------------------------

def _hidden_states(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, (tuple, list)):
        return out[0]
    raise InvalidArgumentError(f"cannot find hidden states in the encoder output ({type(out).__name__})")


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden: [batch, seq, dim]`` over real tokens (``attention_mask: [batch, seq]``) -> [batch, dim]."""
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class EncoderClassifier(nn.Module):
    """An encoder (``BertModel``-like: returns ``last_hidden_state: [batch, seq, dim]``) plus mean
    pooling and a linear head. ``forward(input_ids, attention_mask, ...) -> logits [batch, classes]``.

    Attention sites stay those of ``self.encoder``: observe and apply masks on ``clf.encoder``
    (or on ``clf``; site names then carry the ``encoder.`` prefix).
    """

    def __init__(self, encoder: nn.Module, hidden_size: int, num_labels: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden_size, num_labels)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw) -> torch.Tensor:
        """Pooled features [batch, dim]."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw)
        return mean_pool(_hidden_states(out), attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw) -> torch.Tensor:
        return self.head(self.features(input_ids, attention_mask, **kw))


def _hidden_size(encoder: nn.Module) -> int:
    cfg = getattr(encoder, "config", None)
    for name in ("hidden_size", "d_model", "dim"):
        if cfg is not None and getattr(cfg, name, None):
            return int(getattr(cfg, name))
    raise InvalidArgumentError("train_classifier: cannot tell the encoder's hidden size; pass hidden_size=")


def _finetune_classifier(clf: nn.Module, batches: Sequence[dict], *, epochs: int, lr: float, seed: int,
                         progress: bool, device) -> None:
    """Fine-tune encoder and head together through the one training loop (``attnprune.train``, the
    classification task): AdamW at a constant ``lr``, weight decay 0.01 on matrices, no clipping,
    fp32, ``epochs`` seeded random passes over the examples in batches of the given batches' size."""
    from .train import TrainConfig, finetune as train_loop

    examples = []
    for b in batches:
        am = b.get("attention_mask")
        for i in range(b["input_ids"].shape[0]):
            ids = b["input_ids"][i] if am is None else b["input_ids"][i][am[i].bool()]
            examples.append({"input_ids": ids, "labels": int(b["labels"].view(-1)[i])})
    size = int(batches[0]["input_ids"].shape[0])
    cfg = TrainConfig(steps=max(1, epochs * -(-len(examples) // size)), lr=lr, batch_size=size,
                      schedule="constant", weight_decay=0.01, max_grad_norm=None, precision="fp32", seed=seed,
                      backend="reference", device=str(device), progress=progress)
    train_loop(clf, examples, task="classification", out_dir=None, config=cfg, desc="fine-tune")


def train_classifier(encoder: nn.Module, batches: Sequence[dict], *, num_labels: int = 2,
                     hidden_size: int | None = None, finetune: bool = False, epochs: int = 1,
                     lr: float | None = None, head_iters: int = 200, weight_decay: float = 1e-4, seed: int = 0,
                     progress: bool = True) -> EncoderClassifier:
    """Train a linear classification head on an encoder (optionally fine-tuning the encoder too).

    batches: a re-iterable sequence of dicts with ``input_ids: [batch, seq]``,
    ``attention_mask: [batch, seq]`` and ``labels: [batch]``.
    Head only (default): the encoder's pooled features are computed once (no grad), then the head
    is trained full-batch with L-BFGS on the cross-entropy (``head_iters`` iterations, ``lr``
    its step, default 1). ``finetune=True``: then encoder and head are trained together for
    ``epochs`` passes (``lr`` default 2e-5), starting from that head, through the one training loop
    (:func:`attnprune.train.finetune`, classification task). Returns the classifier in eval mode. Deterministic for a given ``seed``.
    """
    if not batches:
        raise EmptyDatasetError("train_classifier: no training batches")
    torch.manual_seed(seed)
    hidden_size = hidden_size or _hidden_size(encoder)
    clf = EncoderClassifier(encoder, hidden_size, num_labels)
    clf.eval()
    device = _device_of(encoder)
    clf.head.to(device)
    feats, labels = [], []
    with torch.no_grad():
        for b in progress_bar(batches, progress, "features"):
            kw = _to(model_inputs(b), device)
            feats.append(clf.features(**kw).float())
            labels.append(b["labels"].to(device).long().view(-1))
    x, y = torch.cat(feats), torch.cat(labels)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    # train on standardised features, then fold the standardisation into the head
    lin = nn.Linear(x.shape[1], num_labels).to(device)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0 if (finetune or lr is None) else lr, max_iter=head_iters,
                            line_search_fn="strong_wolfe")
    xs = (x - mu) / sd

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(xs), y) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        clf.head.weight.copy_(lin.weight / sd)
        clf.head.bias.copy_(lin.bias - (lin.weight / sd) @ mu)
    if finetune:
        _finetune_classifier(clf, batches, epochs=epochs, lr=lr or 2e-5, seed=seed, progress=progress,
                             device=device)
        clf.eval()
    return clf
