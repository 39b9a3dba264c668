"""Feature autoencoder: reconstruct the frozen backbone's patch features, score by reconstruction error.

After DFR (Shi, Yang, Qi 2021, "Unsupervised anomaly segmentation via deep feature reconstruction",
Neurocomputing 424): a convolutional autoencoder of 1x1 convolutions over multi-scale pretrained
features, trained on normal images only, with the latent width set by PCA on the training features;
a patch the autoencoder cannot reconstruct is anomalous. Chosen over a pixel autoencoder (blurry
reconstructions flag every edge) and over EfficientAD's image-to-feature autoencoder (a second
full network to train: minutes per epoch on two CPU cores): it trains in seconds per epoch on
features computed once, and reuses the backbone and embedding the embedding methods use.

embedding: PatchCore's locally aware features (blocks.2 + blocks.4 for Lite0: 3x3 average pooling,
           the deeper map upsampled to the stride-8 grid; 152 dims), standardised per channel with the
           training images' mean and standard deviation (stored in the model).
network:   1x1 convolutions D -> H -> L -> H -> D (ReLU between, linear output), H = (D + L) / 2,
           L = the number of principal components holding 90% of the standardised training features'
           variance (DFR's rule; clamped to [8, D / 2]).
map:       mean squared reconstruction error over channels per position, upsampled and blurred
           (sigma 4); image score = max of the map.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from engine.errors import ModelFileError
from engine.features.embeddings import patchcore_embedding
from engine.features.maps import grid_to_map
from engine.models.base import ScoreOutput
from engine.models.training import BatchHook, TrainedModel, autocast_for, train_network

PCA_VARIANCE = 0.9


def make_autoencoder(dim: int, latent: int) -> nn.Sequential:
    hidden = (dim + latent) // 2
    return nn.Sequential(
        nn.Conv2d(dim, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, latent, 1), nn.ReLU(),
        nn.Conv2d(latent, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, dim, 1),
    )


def pca_latent(x: torch.Tensor, share: float = PCA_VARIANCE) -> int:
    """Components holding `share` of the variance of (N, D) rows, clamped to [8, D / 2]."""
    cov = torch.cov(x.double().T)
    eig = torch.linalg.eigvalsh(cov).flip(0).clamp_min(0)
    k = int((eig.cumsum(0) / eig.sum() < share).sum()) + 1
    return max(8, min(k, x.shape[1] // 2))


def reconstruction_error(net: nn.Module, emb: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) standardised features -> (B, h, w) mean squared error over channels."""
    return (net(emb).float() - emb.float()).pow(2).mean(dim=1)


class FeatureAE(TrainedModel):
    method = "feature_ae"

    mean: torch.Tensor  # (1, D, 1, 1)
    std: torch.Tensor  # (1, D, 1, 1)
    net: nn.Sequential | None = None

    def _embed(self, feature_maps: list[torch.Tensor]) -> torch.Tensor:
        return patchcore_embedding([f.float() for f in feature_maps])

    def _standardise(self, emb: torch.Tensor) -> torch.Tensor:
        return (emb - self.mean.to(emb.device)) / self.std.to(emb.device)

    def fit_images(self, train: torch.Tensor, holdout: torch.Tensor, on_batch: BatchHook | None = None) -> None:
        t0 = time.perf_counter()
        emb = self._embeddings(train)
        rows = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
        self.mean = rows.mean(0).view(1, -1, 1, 1).float()
        self.std = rows.std(0).clamp_min(1e-6).view(1, -1, 1, 1).float()
        emb = self._standardise(emb)
        latent = pca_latent((rows - self.mean.view(1, -1)) / self.std.view(1, -1))
        held = [self._standardise(self._embeddings(holdout))] if holdout.shape[0] else None
        t1 = time.perf_counter()
        torch.manual_seed(self.cfg.seed)
        net = make_autoencoder(int(emb.shape[1]), latent).to(self.device)

        def loss_fn(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return reconstruction_error(module, x).mean()

        record = train_network(net, loss_fn, [emb], held, self.train_settings(), self.device, on_batch)
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.fit_stats.update(training=record.to_dict(), training_images=int(train.shape[0]), latent_dim=latent,
                              feature_dim=int(emb.shape[1]), seconds_features=round(t1 - t0, 3),
                              seconds_training=round(time.perf_counter() - t1, 3))

    def _embeddings(self, images: torch.Tensor) -> torch.Tensor:
        parts = []
        bs = self.cfg.batch_size
        for start in range(0, images.shape[0], bs):
            parts.append(self._embed(self.features(images[start : start + bs])).cpu())
        if not parts:
            return torch.zeros((0, sum(self.extractor.channels), 1, 1))
        return torch.cat(parts)

    def score_features(self, feature_maps: list[torch.Tensor], loo_owner: torch.Tensor | None = None) -> ScoreOutput:
        if loo_owner is not None:
            raise ValueError("feature_ae has no leave-one-out scores: it is a trained network (calibrate on held-out images)")
        if self.net is None:
            raise RuntimeError("the feature autoencoder is not trained yet")
        emb = self._standardise(self._embed(feature_maps))
        with autocast_for(self.device, self.cfg.precision):
            err = reconstruction_error(self.net, emb)
        maps = grid_to_map(err.float(), self.input_size, self.cfg.blur_sigma)
        return ScoreOutput(maps.amax(dim=(1, 2)).float(), maps.float())

    def tensors(self) -> dict[str, torch.Tensor]:
        assert self.net is not None
        out = {"mean": self.mean.float().cpu().contiguous(), "std": self.std.float().cpu().contiguous()}
        out.update({f"ae.{k}": v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()})
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        dim = sum(self.extractor.channels)
        for name in ("mean", "std", "ae.2.weight"):
            if name not in tensors:
                raise ModelFileError(f"the feature autoencoder file lacks tensor {name!r}")
        if tuple(tensors["mean"].shape) != (1, dim, 1, 1) or tuple(tensors["std"].shape) != (1, dim, 1, 1):
            raise ModelFileError(f"mean/std must be (1, {dim}, 1, 1) for {self.cfg.backbone} {self.cfg.layers}, "
                                 f"got {list(tensors['mean'].shape)} / {list(tensors['std'].shape)}")
        latent = int(tensors["ae.2.weight"].shape[0])
        net = make_autoencoder(dim, latent)
        wanted = net.state_dict()
        given = {k.removeprefix("ae."): v for k, v in tensors.items() if k.startswith("ae.")}
        if set(given) != set(wanted):
            raise ModelFileError(f"the autoencoder tensors {sorted(given)} do not fit its layers {sorted(wanted)}")
        for k, v in wanted.items():
            if tuple(given[k].shape) != tuple(v.shape):
                raise ModelFileError(f"autoencoder tensor {k!r} has shape {list(given[k].shape)}, "
                                     f"the network needs {list(v.shape)}")
        net.load_state_dict(given, strict=True)
        self.mean, self.std = tensors["mean"].float(), tensors["std"].float()
        self.net = net.to(self.device).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
