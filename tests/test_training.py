"""The shared training loop (engine/models/training.py): stop rule, best epoch kept, reproducibility."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.models.training import TrainSettings, train_network


def _line(x: torch.Tensor, y: torch.Tensor):
    return lambda net, xb, yb: (net(xb) - yb).pow(2).mean()


def _data(slope: float, n: int = 64) -> list[torch.Tensor]:
    x = torch.linspace(-1, 1, n).view(-1, 1)
    return [x, slope * x]


def _settings(**kw) -> TrainSettings:
    base = dict(max_epochs=200, patience=3, batch_size=16, learning_rate=0.05, seed=0, precision="fp32")
    base.update(kw)
    return TrainSettings(**base)


def test_stops_when_the_holdout_loss_turns_and_keeps_the_best_epoch() -> None:
    """Training data pull the slope from 0 to 1; the hold-out's slope is 0.5: its loss falls, then rises."""
    net = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(net.weight)
    loss = _line(None, None)
    rec = train_network(net, loss, _data(1.0), _data(0.5), _settings(), torch.device("cpu"))
    best = min(range(rec.epochs), key=lambda i: rec.holdout_loss[i])
    assert rec.best_epoch == best + 1 < rec.epochs == rec.best_epoch + 3
    assert "did not improve" in rec.stop_reason
    assert rec.holdout_loss[-1] > rec.holdout_loss[best]
    # the net holds the best epoch's weights: its hold-out loss is the recorded best
    x, y = _data(0.5)
    with torch.no_grad():
        assert float(loss(net, x, y)) == pytest.approx(rec.best_holdout_loss, rel=1e-6)


def test_a_flat_holdout_loss_stops_after_patience_epochs() -> None:
    """A hold-out the network cannot change (zero inputs): a plateau from the first epoch."""
    net = nn.Linear(1, 1, bias=False)
    zeros = [torch.zeros(32, 1), torch.ones(32, 1)]
    rec = train_network(net, _line(None, None), _data(1.0), zeros, _settings(patience=4), torch.device("cpu"))
    assert rec.best_epoch == 1 and rec.epochs == 5 and len(rec.holdout_loss) == len(rec.seconds) == 5
    assert len(set(rec.holdout_loss)) == 1


def test_max_epochs_bounds_training_and_runs_repeat_bitwise() -> None:
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        net = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
        rec = train_network(net, _line(None, None), _data(2.0), _data(2.0, 16), _settings(max_epochs=4, patience=10),
                            torch.device("cpu"))
        runs.append((rec, {k: v.clone() for k, v in net.state_dict().items()}))
    (a, wa), (b, wb) = runs
    assert a.epochs == 4 and a.stop_reason.startswith("max_epochs")
    assert a.train_loss == b.train_loss and a.holdout_loss == b.holdout_loss
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
