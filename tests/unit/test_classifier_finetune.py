"""``train_classifier(finetune=True)`` trains encoder and head through the one training loop."""

import torch

from attnprune.evaluate import accuracy, train_classifier
from test_evaluate import ToyEncoder, _toy_cls_batches


def _params(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_finetuning_moves_the_encoder_deterministically():
    train, test = _toy_cls_batches(8, 0), _toy_cls_batches(4, 1)
    torch.manual_seed(0)
    frozen = _params(train_classifier(ToyEncoder(), train, hidden_size=8, progress=False))
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        clf = train_classifier(ToyEncoder(), train, hidden_size=8, finetune=True, epochs=2, lr=1e-2, progress=False)
        assert not clf.training
        runs.append(_params(clf))
    moved = [k for k in frozen if k.startswith("encoder.") and not torch.equal(frozen[k], runs[0][k])]
    assert moved, "fine-tuning must change the encoder"
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert accuracy(clf, test, progress=False).value >= 0.95
