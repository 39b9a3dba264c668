"""PatchCore (Roth et al. 2022): a coreset memory bank of normal patch features, nearest-neighbour scores.

fit:   patch embeddings of every training image -> random projection (selection only) -> greedy
       k-center coreset of `coreset_ratio` of the patches -> memory bank (full-dimensional rows).
score: patch score = distance to the nearest bank row; map = patch scores upsampled to the input and
       blurred (sigma 4); image score = the max patch score reweighted by 1 - softmax over the distances
       from that patch to the `num_neighbors` bank rows nearest its nearest bank row (the paper's eq. 7).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from engine.blur import grid_to_map
from engine.features import patchcore_embedding, to_rows
from engine.models.base import AnomalyModel, ScoreOutput
from kernels import coreset, knn
from kernels.knn_index import KnnIndex

# Above this many bytes of float32 training embeddings, they are kept in float16 during the fit.
EMBEDDING_FP32_BUDGET = 2 * 1024**3


class PatchCore(AnomalyModel):
    method = "patchcore"

    bank: torch.Tensor
    bank_sq_norms: torch.Tensor

    def fit_features(self, batches: Iterable[list[torch.Tensor]], n_images: int) -> None:
        t0 = time.perf_counter()
        rows_store: torch.Tensor | None = None
        filled = 0
        for fmaps in batches:
            rows = to_rows(patchcore_embedding(fmaps)).float().cpu()
            if rows_store is None:
                per_image = rows.shape[0] // fmaps[0].shape[0]
                total = per_image * n_images
                dtype = torch.float32 if total * rows.shape[1] * 4 <= EMBEDDING_FP32_BUDGET else torch.float16
                rows_store = torch.empty((total, rows.shape[1]), dtype=dtype)
            rows_store[filled : filled + rows.shape[0]] = rows
            filled += rows.shape[0]
        assert rows_store is not None, "no training batches"
        embeddings = rows_store[:filled]
        self._set_column_weights(self._balance(embeddings))
        t1 = time.perf_counter()
        picks, radius = self._select_coreset(embeddings)
        t2 = time.perf_counter()
        self._set_bank(embeddings[picks].float())
        self.fit_stats.update(
            training_patches=int(embeddings.shape[0]),
            bank_size=int(picks.numel()),
            coreset_covering_radius_projected=radius,
            seconds_features=round(t1 - t0, 3),
            seconds_coreset=round(t2 - t1, 3),
        )

    def _balance(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Per-column weights w_l = sqrt(V / (L V_l)) (V_l: layer l's summed column variances on the
        training patches, V their total) applied in place, so each of the L layers carries V / L of
        the variance; ones when `balance_layers` is off. Lite0 blocks.2 + blocks.4 on bottle: 1.20 /
        0.87 (pcb 1.07 / 0.95); pcb image AUROC 0.7016 -> 0.7048, bottle pixel AUROC 0.9832 -> 0.9846
        (benchmarks/results/fit_accuracy_cpu_balance_layers.json)."""
        dim = embeddings.shape[1]
        channels = list(self.extractor.channels)
        if not self.cfg.balance_layers or len(channels) < 2:
            return torch.ones(dim)
        total = torch.zeros(dim, dtype=torch.float64)
        total_sq = torch.zeros(dim, dtype=torch.float64)
        for start in range(0, embeddings.shape[0], 65536):
            chunk = embeddings[start : start + 65536].double()
            total += chunk.sum(0)
            total_sq += chunk.pow(2).sum(0)
        n = embeddings.shape[0]
        col_var = (total_sq - total.pow(2) / n) / max(1, n - 1)
        layer_var = torch.stack([part.sum() for part in col_var.split(channels)])
        scale = (layer_var.sum() / (len(channels) * layer_var.clamp_min(1e-12))).sqrt().float()
        weights = scale.repeat_interleave(torch.tensor(channels))
        for start in range(0, n, 65536):
            embeddings[start : start + 65536] *= weights.to(embeddings.dtype)
        return weights

    def _set_column_weights(self, weights: torch.Tensor) -> None:
        self.column_weights = weights.float().cpu()
        # Unit weights (the default) cost nothing per batch; others are kept on the device, shaped.
        unit = bool((self.column_weights == 1).all())
        self._column_scale = None if unit else self.column_weights.to(self.device).view(1, -1, 1, 1)

    def _embed(self, feature_maps: list[torch.Tensor]) -> torch.Tensor:
        """Patch embeddings with the fitted column weights applied, (B, C, H, W) float32."""
        emb = patchcore_embedding(feature_maps).float()
        return emb if self._column_scale is None else emb * self._column_scale

    def _select_coreset(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Greedy k-center on a seeded Gaussian random projection of the embeddings."""
        n_total = embeddings.shape[0]
        n_keep = max(1, min(n_total, round(self.cfg.coreset_ratio * n_total)))
        if n_keep == n_total:
            return torch.arange(n_total), 0.0
        projected, start = project_for_coreset(embeddings, self.cfg.projection_dim, self.cfg.seed)
        if self.device.type == "cuda":
            projected = projected.to(self.device)
        picks, radius = coreset.greedy_kcenter_with_radius(projected, n_keep, start=start)
        return picks.cpu(), radius

    def _set_bank(self, bank: torch.Tensor) -> None:
        self.bank = bank.contiguous().to(self.device)
        self.bank_sq_norms = knn.sq_norms(self.bank)  # once per bank, not per query batch
        self._index: KnnIndex | None = None

    def prepare_scoring(self) -> None:
        """Build the CPU index now (once), so threads that score at the same time share it."""
        if self.device.type != "cuda" and self._index is None:
            self._index = KnnIndex.build(self.bank, seed=self.cfg.seed)

    def nearest(self, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact k nearest bank rows: the fused kernel on CUDA, a pruned cell index on CPUs."""
        if self.device.type == "cuda":
            return knn.topk(rows, self.bank, k, bank_sq_norms=self.bank_sq_norms)
        self.prepare_scoring()
        assert self._index is not None
        return self._index.search(rows, k)

    def score_features(self, feature_maps: list[torch.Tensor]) -> ScoreOutput:
        emb = self._embed(feature_maps)
        b, c, h, w = emb.shape
        rows = to_rows(emb)
        dist, idx = self.nearest(rows, 1)
        patch_scores = dist[:, 0].view(b, h * w)
        image_scores = self._reweighted_max(patch_scores, idx[:, 0].view(b, h * w), rows.view(b, h * w, c))
        maps = grid_to_map(patch_scores.view(b, h, w), self.input_size, self.cfg.blur_sigma)
        return ScoreOutput(image_scores.float(), maps.float())

    def _reweighted_max(self, patch_scores: torch.Tensor, nn_idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Max patch score times 1 - softmax(distances to the bank neighbours of its nearest entry)[0]."""
        batch = torch.arange(patch_scores.shape[0], device=patch_scores.device)
        worst = patch_scores.argmax(dim=1)
        score = patch_scores[batch, worst]
        k = min(self.cfg.num_neighbors, self.bank.shape[0])
        if k <= 1:
            return score
        _, support = self.nearest(self.bank[nn_idx[batch, worst]], k)  # (B, k), first is the entry itself
        worst_rows = rows[batch, worst]  # (B, C)
        dists = torch.linalg.vector_norm(self.bank[support] - worst_rows[:, None, :], dim=2)
        weights = 1.0 - torch.softmax(dists, dim=1)[:, 0]
        return weights * score

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"bank": self.bank.detach().float().cpu().contiguous(), "column_weights": self.column_weights.contiguous()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._set_bank(tensors["bank"].float())
        # Files from before layer balancing hold no weights: their banks are unweighted.
        self._set_column_weights(tensors.get("column_weights", torch.ones(self.bank.shape[1])))

    def extra_meta(self) -> dict:
        bank = getattr(self, "bank", None)
        return {"bank_size": int(bank.shape[0]) if bank is not None else 0, "feature_dim": self._feature_dim()}

    def _feature_dim(self) -> int:
        return int(sum(self.extractor.channels))



def project_for_coreset(embeddings: torch.Tensor, dim: int, seed: int) -> tuple[torch.Tensor, int]:
    """Seeded Gaussian random projection to `dim` columns (Johnson-Lindenstrauss: distances kept to a
    few percent) and the seeded first pick; dim <= 0 or >= the feature dim keeps the rows as they are."""
    n_total, feat_dim = embeddings.shape
    gen = torch.Generator().manual_seed(seed)
    if 0 < dim < feat_dim:
        matrix = torch.randn(feat_dim, dim, generator=gen) / dim**0.5
        projected = torch.cat([embeddings[i : i + 65536].float() @ matrix for i in range(0, n_total, 65536)])
    else:
        projected = embeddings.float()
    return projected, int(torch.randint(n_total, (1,), generator=gen))
