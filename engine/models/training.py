"""Training networks on normal images: the loop the trained methods (STFPM, feature AE) share.

- Seeded and reproducible on one machine: torch.manual_seed, a seeded permutation per epoch,
  torch.use_deterministic_algorithms while training; the same thread count gives the same loss curve
  and the same weights (tests/test_stfpm.py trains twice and compares bitwise).
- Mixed precision: bf16 autocast when the model's resolved precision is bf16 (native bf16 hardware:
  CUDA, AVX512-BF16 / AMX CPUs; engine.models.base.resolve_precision), fp32 otherwise. Loss and
  optimiser state stay fp32.
- Mini-batches are drawn from tensors held in memory (decoded once, at the model input size; targets
  such as a frozen teacher's features computed once), in a seeded order per epoch; a last batch
  shorter than half a batch is dropped (BatchNorm needs more than one sample, and tiny batches are noise).
- Stop rule from normal images only: the loss on held-out normal images after every epoch; training
  stops when it has not improved by `min_improvement` (relative) for `patience` epochs, or at
  `max_epochs`, and the weights of the best hold-out epoch are kept.
- The record (per-epoch train / hold-out loss, seconds, best epoch, why it stopped) goes to model.json.

The caller supplies the network, a loss function and the data; nothing here knows a method.
"""

from __future__ import annotations

import math
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from engine.errors import DataError
from engine.models.base import AnomalyModel

# (batches done, batches at most, text about the loss) after every batch
BatchHook = Callable[[int, int, str], None]
LossFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class TrainSettings:
    max_epochs: int
    patience: int
    batch_size: int
    learning_rate: float
    seed: int
    precision: str  # "bf16" or "fp32" (resolved)
    weight_decay: float = 0.0
    min_improvement: float = 1e-3  # relative improvement of the hold-out loss that counts as progress


@dataclass
class TrainRecord:
    """What happened during training; saved under model.json fit.training."""

    epochs: int = 0
    best_epoch: int = 0
    best_holdout_loss: float = float("nan")
    train_loss: list[float] = field(default_factory=list)
    holdout_loss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    stop_reason: str = ""
    train_images: int = 0
    holdout_images: int = 0
    batches_per_epoch: int = 0
    precision: str = "fp32"
    threads: int = 1
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["train_loss"] = [round(v, 7) for v in self.train_loss]
        out["holdout_loss"] = [round(v, 7) for v in self.holdout_loss]
        out["seconds"] = [round(v, 3) for v in self.seconds]
        out["seconds_total"] = round(sum(self.seconds), 3)
        return out


@contextmanager
def deterministic() -> Iterable[None]:
    """torch.use_deterministic_algorithms for the duration (warn-only: an op without a deterministic
    kernel warns rather than fails), restored afterwards."""
    before, warn_before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_before)


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast for precision bf16, else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _batches(n: int, batch_size: int, order: torch.Tensor | None) -> list[torch.Tensor]:
    idx = order if order is not None else torch.arange(n)
    chunks = [idx[i : i + batch_size] for i in range(0, n, batch_size)]
    if order is not None and len(chunks) > 1 and chunks[-1].numel() * 2 < batch_size:
        chunks.pop()  # a short last training batch: noisy, and one sample breaks BatchNorm
    return chunks


def _mean_loss(net: nn.Module, loss_fn: LossFn, data: Sequence[torch.Tensor], batch_size: int,
               device: torch.device, precision: str) -> float:
    total, count = 0.0, 0
    net.eval()
    with torch.no_grad(), autocast_for(device, precision):
        for idx in _batches(data[0].shape[0], batch_size, None):
            loss = loss_fn(net, *(t[idx].to(device) for t in data))
            total += float(loss.float()) * idx.numel()
            count += idx.numel()
    return total / max(count, 1)


def train_network(
    net: nn.Module,
    loss_fn: LossFn,
    train: Sequence[torch.Tensor],
    holdout: Sequence[torch.Tensor] | None,
    settings: TrainSettings,
    device: torch.device,
    on_batch: BatchHook | None = None,
) -> TrainRecord:
    """Train `net` (in place) with Adam on `train` (tensors indexed along dim 0 together):
    loss_fn(net, *batch) -> scalar mean loss. Returns the record; `net` holds the best epoch's weights."""
    n = int(train[0].shape[0])
    if n < 1:
        raise DataError("no training images to train on")
    torch.manual_seed(settings.seed)
    order_gen = torch.Generator().manual_seed(settings.seed)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    per_epoch = len(_batches(n, settings.batch_size, torch.arange(n)))
    total_batches = per_epoch * settings.max_epochs
    hold_n = int(holdout[0].shape[0]) if holdout else 0
    rec = TrainRecord(train_images=n, holdout_images=hold_n, batches_per_epoch=per_epoch,
                      precision=settings.precision, threads=torch.get_num_threads(), settings=asdict(settings))
    best_state: dict[str, torch.Tensor] | None = None
    best, since = math.inf, 0
    done = 0
    note = ""
    with deterministic():
        for epoch in range(1, settings.max_epochs + 1):
            t0 = time.perf_counter()
            net.train()
            running, seen = 0.0, 0
            for idx in _batches(n, settings.batch_size, torch.randperm(n, generator=order_gen)):
                batch = [t[idx].to(device) for t in train]
                with autocast_for(device, settings.precision):
                    loss = loss_fn(net, *batch)
                value = float(loss.detach().float())
                if not math.isfinite(value):
                    raise DataError(f"training diverged: the loss is {value} in epoch {epoch}; lower learning_rate")
                opt.zero_grad(set_to_none=True)
                loss.float().backward()
                opt.step()
                running += value * idx.numel()
                seen += idx.numel()
                done += 1
                if on_batch is not None:
                    on_batch(done, total_batches, note or f"epoch {epoch} loss {running / seen:.4g}")
            train_loss = running / max(seen, 1)
            held = _mean_loss(net, loss_fn, holdout, settings.batch_size, device, settings.precision) if hold_n else train_loss
            rec.epochs = epoch
            rec.train_loss.append(train_loss)
            rec.holdout_loss.append(held)
            rec.seconds.append(time.perf_counter() - t0)
            if held < best * (1.0 - settings.min_improvement) or best_state is None:
                best, since, rec.best_epoch = held, 0, epoch
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                since += 1
            note = f"epoch {epoch} loss {train_loss:.4g}, hold-out {held:.4g} (best {best:.4g} @ {rec.best_epoch})"
            if since >= settings.patience:
                which = "hold-out" if hold_n else "training"
                rec.stop_reason = (f"{which} loss did not improve by {settings.min_improvement:.1%} for "
                                   f"{settings.patience} epochs")
                break
        else:
            rec.stop_reason = f"max_epochs ({settings.max_epochs}) reached"
    assert best_state is not None
    net.load_state_dict(best_state)
    net.eval()
    rec.best_holdout_loss = best
    if on_batch is not None:
        on_batch(total_batches, total_batches, note)
    return rec


class TrainedModel(AnomalyModel):
    """A method whose statistics are a network trained on normal images (not a bank or Gaussians).

    The fit hands it the decoded training and hold-out images (engine.api.fit); leave-one-out scoring
    does not apply (that would mean one training run per image), so its threshold comes from the
    hold-out images' scores; `vade update` refuses (adding images means training again)."""

    trained = True

    def fit_features(self, batches, n_images, owners=None) -> None:  # noqa: ANN001 - the base signature
        raise NotImplementedError(f"{self.method} is trained from images: use fit_images")

    @abstractmethod
    def fit_images(self, train: torch.Tensor, holdout: torch.Tensor, on_batch: BatchHook | None = None) -> None:
        """Train on float32 (N, 3, S, S) normal images in [0, 1], stopping on the hold-out images' loss."""

    def train_settings(self) -> TrainSettings:
        cfg = self.cfg
        return TrainSettings(cfg.max_epochs, cfg.patience, cfg.batch_size, cfg.learning_rate, cfg.seed, cfg.precision,
                             cfg.weight_decay)

    def extra_meta(self) -> dict:
        training = self.fit_stats.get("training") or {}
        return {"bank_size": 0, "trained_epochs": training.get("epochs"), "best_epoch": training.get("best_epoch")}
