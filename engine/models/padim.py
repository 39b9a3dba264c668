"""PaDiM (Defard et al. 2020): one Gaussian per feature-grid position, Mahalanobis distance as score.

fit:   embeddings of early backbone layers on the finest grid, a fixed seeded random channel subset;
       per position mean and covariance (+ eps * I), inverted to precision matrices.
score: map = Mahalanobis distance per position, upsampled to the input and blurred (sigma 4);
       image score = max of the map. Where the fused kernel runs (CUDA), the precision's Cholesky
       factor is made once, on the first scored batch, and the kernel takes the triangular path: half
       the reads of the full matrix and no spills (benchmarks/results/compile_sm90.json).
leave-one-out (`loo_owner`): a training image's score under the Gaussians fitted without it, in
       closed form from its in-sample distance. With u = x - mean, m = u' P u (P the regularised
       precision), removing x gives mean' = mean - u / (n - 1) and (n-2) S' = (n-1) S - n/(n-1) u u'.
       Regularising the downdated covariance with eps * (n-1)/(n-2) (eps scaled with S, a relative
       change of 1/(n-2)) makes C' = a C - b u u' with a = (n-1)/(n-2), b = n/((n-1)(n-2)), a rank-one
       downdate; Sherman-Morrison then gives
           d'^2 = (n/(n-1))^2 m / (a (1 - n m / (n-1)^2)),
       one scalar per position: no per-image refit, no second covariance (tests/test_calibration_loo.py
       checks it against an explicit refit without the image). K folds would need K refits and
       inversions of P x D x D covariances.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch

from engine.features.embeddings import padim_embedding
from engine.features.maps import grid_to_map
from engine.models.base import AnomalyModel, ScoreOutput
from kernels import mahalanobis
from kernels._checks import use_triton
from kernels._threads import torch_threads


class PaDiM(AnomalyModel):
    method = "padim"

    mean: torch.Tensor  # (P, D)
    precision: torch.Tensor  # (P, D, D)
    channel_idx: torch.Tensor  # (D,) int64
    factor: torch.Tensor | None = None  # (P, D, D) Cholesky factor of the precision, where the kernel runs
    kernel_backend = "auto"  # kernels' backend=: Triton on CUDA tensors (tests set "triton" on a CPU)

    def _choose_channels(self) -> torch.Tensor:
        total = sum(self.extractor.channels)
        n = min(self.cfg.padim_features, total)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        return torch.randperm(total, generator=gen)[:n].sort().values

    def fit_features(
        self, batches: Iterable[list[torch.Tensor]], n_images: int, owners: Sequence[int] | None = None
    ) -> None:
        t0 = time.perf_counter()
        self.channel_idx = self._choose_channels()
        total = sums = outer = None
        count = 0
        for fmaps in batches:
            emb = padim_embedding(fmaps, self.channel_idx)  # (B, D, H, W)
            b, d, h, w = emb.shape
            # (P, B, D) contiguous: batched GEMMs on strided views take a path ~20x slower
            x = emb.permute(2, 3, 0, 1).reshape(h * w, b, d).double().contiguous()
            if total is None:
                sums = torch.zeros((h * w, d), dtype=torch.float64, device=emb.device)
                outer = torch.zeros((h * w, d, d), dtype=torch.float64, device=emb.device)
                total = True
            sums += x.sum(dim=1)
            outer.baddbmm_(x.transpose(1, 2), x)
            count += b
        if count < 2:
            raise ValueError("PaDiM needs at least 2 training images")
        mean = sums / count
        cov = (outer - count * mean[:, :, None] * mean[:, None, :]) / (count - 1)
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        cov += self.cfg.covariance_eps * eye  # sized to the backbone's feature scale: DEFAULT_COVARIANCE_EPS
        # Thousands of small factorisations: one thread each is ~20x faster than LAPACK's threads
        # fighting over the cores (measured: 4,096 x 176 x 176 in 15 s instead of 200 s).
        with torch_threads(1):
            precision = torch.cholesky_inverse(torch.linalg.cholesky(cov))
        self._set_stats(mean.float(), precision.float())
        self.fit_stats.update(
            training_images=count,
            positions=int(mean.shape[0]),
            feature_dim=int(mean.shape[1]),
            seconds_features=round(time.perf_counter() - t0, 3),
        )

    def _set_stats(self, mean: torch.Tensor, precision: torch.Tensor) -> None:
        self.mean = mean.contiguous().to(self.device)
        self.precision = precision.contiguous().to(self.device)
        self.factor = None

    def prepare_scoring(self) -> None:
        """Make the Cholesky factor once where the fused kernel scores (the triangular path)."""
        if self.factor is None and use_triton(self.kernel_backend, self.mean):
            self.factor = mahalanobis.precision_factor(self.precision)

    def score_features(self, feature_maps: list[torch.Tensor], loo_owner: torch.Tensor | None = None) -> ScoreOutput:
        emb = padim_embedding(feature_maps, self.channel_idx).float()
        b, d, h, w = emb.shape
        x = emb.permute(0, 2, 3, 1).reshape(b, h * w, d).contiguous()  # (B, P, D)
        self.prepare_scoring()
        dist = mahalanobis.mahalanobis(x, self.mean, self.precision, backend=self.kernel_backend, factor=self.factor)
        if loo_owner is not None:
            dist = loo_distance(dist, int(self.fit_stats.get("training_images", 0)))
        maps = grid_to_map(dist.view(b, h, w), self.input_size, self.cfg.blur_sigma)
        return ScoreOutput(maps.amax(dim=(1, 2)).float(), maps.float())

    def update_stats(self, batches: Iterable[list[torch.Tensor]]) -> dict:
        """`vade update`: add normal images to the per-position Gaussians. The sufficient statistics
        (n, sum, sum of outer products) are recovered from the stored mean and precision: S =
        inverse(precision) - eps I (well conditioned: eps regularises it), so nothing more is stored (the
        outer products in float64 would be P x D x D x 8 bytes, 1 GB at 4,096 x 176, four times the
        model); the float32 precision limits the result to ~1e-6 relative of a refit."""
        n = int(self.fit_stats.get("training_images", 0))
        if n < 2:
            raise ValueError("this PaDiM model does not record how many images it was fitted on: refit it to update")
        mean = self.mean.double().cpu()
        eye = torch.eye(mean.shape[1], dtype=torch.float64)
        with torch_threads(1):
            cov = torch.cholesky_inverse(torch.linalg.cholesky(self.precision.double().cpu())) - self.cfg.covariance_eps * eye
        sums = n * mean
        outer = (n - 1) * cov + n * mean[:, :, None] * mean[:, None, :]
        added = 0
        for fmaps in batches:
            emb = padim_embedding(fmaps, self.channel_idx)
            b, d, h, w = emb.shape
            x = emb.permute(2, 3, 0, 1).reshape(h * w, b, d).double().cpu().contiguous()
            sums += x.sum(dim=1)
            outer.baddbmm_(x.transpose(1, 2), x)
            added += b
        count = n + added
        mean = sums / count
        cov = (outer - count * mean[:, :, None] * mean[:, None, :]) / (count - 1) + self.cfg.covariance_eps * eye
        with torch_threads(1):
            precision = torch.cholesky_inverse(torch.linalg.cholesky(cov))
        self._set_stats(mean.float(), precision.float())
        self.fit_stats["training_images"] = count
        return {"images_before": n, "added": added, "training_images": count}

    def tensors(self) -> dict[str, torch.Tensor]:
        d = self.precision.shape[-1]
        rows, cols = torch.tril_indices(d, d)
        return {
            "mean": self.mean.float().cpu().contiguous(),
            "precision_tril": self.precision[:, rows, cols].float().cpu().contiguous(),
            "channel_idx": self.channel_idx.long().cpu().contiguous(),
        }

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        mean, packed = tensors["mean"], tensors["precision_tril"]
        p, d = mean.shape
        rows, cols = torch.tril_indices(d, d)
        precision = torch.zeros((p, d, d), dtype=torch.float32)
        precision[:, rows, cols] = packed.float()
        precision[:, cols, rows] = packed.float()
        self.channel_idx = tensors["channel_idx"].long()
        self._set_stats(mean.float(), precision)

    def extra_meta(self) -> dict:
        mean = getattr(self, "mean", None)
        if mean is None:
            return {}
        return {"positions": int(mean.shape[0]), "feature_dim": int(mean.shape[1]), "bank_size": 0}


def loo_distance(dist: torch.Tensor, n: int) -> torch.Tensor:
    """In-sample Mahalanobis distances of training vectors -> their leave-one-out distances (module
    docstring), for Gaussians fitted on n >= 3 images."""
    if n < 3:
        raise ValueError(f"leave-one-out needs a PaDiM fitted on at least 3 images, this one has {n}")
    m = dist.double().pow(2)
    a = (n - 1) / (n - 2)
    loo = (n / (n - 1)) ** 2 * m / (a * (1 - n * m / (n - 1) ** 2)).clamp_min(1e-300)
    return loo.sqrt().to(dist.dtype)
