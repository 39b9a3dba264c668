"""PatchCore (Roth et al. 2022): a coreset memory bank of normal patch features, nearest-neighbour scores.

fit:   patch embeddings of every training image -> per-layer weights (`layer_balance`) -> random
       projection (selection only) -> greedy k-center coreset of `coreset_ratio` of the patches ->
       memory bank (full-dimensional weighted rows).
score: patch score = distance to the nearest bank row; map = patch scores upsampled to the input and
       blurred (sigma 4); image score = the max patch score reweighted by 1 - softmax over the distances
       from that patch to the `num_neighbors` bank rows nearest its nearest bank row (the paper's eq. 7).
owner: `bank_owner[j]` is the training image (its index in the fit's image list) that bank row j came
       from; tiles of one image share it. Scoring with `loo_owner` (one owner per image or tile)
       excludes those rows: a training image's leave-one-out score, as if the bank had been built
       without it (the bank's own neighbour table for the reweighting is kept as it is). Files from
       before owners were kept load with `bank_owner = None` and cannot score leave-one-out.
       `loo_method` (the fit's `calibration_images`, owners set before it):
       exclude (default) the bank without the image's rows;
       fold    the bank is selected on the other images first and the greedy k-center then continues
               over the calibration images' patches down to that covering radius (as `vade update`
               adds images); `out_of_sample(images, as_group=True)` scores them against the bank
               without any of their rows (and a neighbour table without them): exactly the scores a
               bank selected without them gives (tests/test_calibration_fold.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch

from engine.features.embeddings import patchcore_embedding, to_rows
from engine.features.maps import grid_to_map
from engine.models.base import AnomalyModel, ScoreOutput
from kernels import coreset, knn
from kernels.knn_index import KnnIndex

# Above this many bytes of float32 training embeddings, they are kept in float16 during the fit.
EMBEDDING_FP32_BUDGET = 2 * 1024**3
# Training patches left out of the coreset whose nearest-entry residuals set `layer_balance: nearest`.
NEAREST_SAMPLE = 20_000
# `layer_balance: nearest` measures those residuals against a coreset of (a seeded sample of) this
# many training images (tiles), picked at the fit's ratio and candidate stride, so the extra greedy
# costs a bounded (units / all)^2 of the final one. A sample's coreset covers a little more coarsely
# (fewer images to borrow neighbours from): pcb's weight ratio from 200 of its 400 images is within
# 1.3% of all 400's (100: 4-10% lower) at 12 s instead of 40 (benchmarks/results/layer_share_*.json).
NEAREST_UNITS = 200
# The owner id a calibration fold's rows take while the fold is scored as a group (`out_of_sample`).
FOLD_OWNER = -1


class PatchCore(AnomalyModel):
    method = "patchcore"
    fits_fold_last = True

    bank: torch.Tensor
    bank_sq_norms: torch.Tensor
    bank_owner: torch.Tensor | None = None  # (M,) int32: the training image of each bank row
    _fold_out: bool = False  # while scoring a fold as a group: neighbour tables exclude FOLD_OWNER rows

    def fit_features(
        self, batches: Iterable[list[torch.Tensor]], n_images: int, owners: Sequence[int] | None = None
    ) -> None:
        t0 = time.perf_counter()
        rows_store: torch.Tensor | None = None
        filled = 0
        for fmaps in batches:
            rows = to_rows(patchcore_embedding(fmaps)).float().cpu()
            if rows_store is None:
                self._fit_grid = tuple(fmaps[0].shape[-2:])  # patch grid per image (tile)
                per_image = rows.shape[0] // fmaps[0].shape[0]
                total = per_image * n_images
                dtype = torch.float32 if total * rows.shape[1] * 4 <= EMBEDDING_FP32_BUDGET else torch.float16
                rows_store = torch.empty((total, rows.shape[1]), dtype=dtype)
            rows_store[filled : filled + rows.shape[0]] = rows
            filled += rows.shape[0]
        assert rows_store is not None, "no training batches"
        embeddings = rows_store[:filled]
        t1 = time.perf_counter()
        row_owner = None
        if owners is not None:  # filled while `batches` was read: one owner per image (tile)
            per_unit = self._fit_grid[0] * self._fit_grid[1]
            unit_owner = torch.as_tensor(list(owners), dtype=torch.int32)
            if unit_owner.numel() * per_unit == embeddings.shape[0]:
                row_owner = unit_owner.repeat_interleave(per_unit)
        in_fold = None
        method = self.cfg.loo_method if self.calibration_images and row_owner is not None else None
        if method == "fold":
            in_fold = torch.isin(row_owner, torch.as_tensor(self.calibration_images, dtype=torch.int32))
            if bool(in_fold.all()) or not bool(in_fold.any()):
                in_fold = None
        picks, radius = self._weighted_coreset(embeddings, in_fold)
        t2 = time.perf_counter()
        self.bank_owner = None if row_owner is None else row_owner[picks].contiguous()
        self._set_bank(embeddings[picks].float())
        self.fit_stats.update(
            training_patches=int(embeddings.shape[0]),
            bank_size=int(picks.numel()),
            coreset_covering_radius_projected=radius,
            layer_weights=[round(float(w), 4) for w in self._layer_weights()],
            seconds_features=round(t1 - t0, 3),
            seconds_coreset=round(t2 - t1, 3),
        )

    def _weighted_coreset(
        self, embeddings: torch.Tensor, in_fold: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, float]:
        """Layer weights per `layer_balance`, applied to the embeddings in place, and the coreset
        (picks, covering radius) selected on the weighted embeddings; `in_fold` (per row): the
        calibration fold's rows, fitted last (`_fold_last_coreset`)."""
        channels = list(self.extractor.channels)
        mode = self.cfg.layer_balance if len(channels) > 1 else "none"
        share = self.layer_shares(embeddings, mode)
        # w_l^2 share_l equal for every layer; the weights' product is 1.
        layer_w = (share.log().mean().exp() / share.clamp_min(1e-12)).sqrt().float()
        weights = layer_w.repeat_interleave(torch.tensor(channels))
        self._set_column_weights(weights)
        if mode != "none":
            for start in range(0, embeddings.shape[0], 65536):
                embeddings[start : start + 65536] *= weights.to(embeddings.dtype)
        if in_fold is not None:
            return self._fold_last_coreset(embeddings, in_fold)
        return self._select_coreset(embeddings)

    def _fold_last_coreset(self, embeddings: torch.Tensor, in_fold: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The coreset of the rows outside the fold (exactly a fit without the fold's images, at the
        candidate stride of all rows), then the greedy continued over the fold's candidates down to
        its covering radius: (picks, that radius)."""
        n_total = embeddings.shape[0]
        rest = (~in_fold).nonzero().squeeze(1)
        fold = in_fold.nonzero().squeeze(1)
        picks, radius = self._select_coreset(embeddings[rest], stride_rows=n_total)
        picks = rest[picks]
        fold = fold[self._grid_keep(fold, int(self.fit_stats.get("coreset_candidate_stride", 1)))]
        added, _, _ = self._continue_greedy(embeddings[picks].float(), embeddings[fold].float(), radius)
        self.fit_stats.update(calibration_fold_images=len(self.calibration_images), calibration_fold_rows=int(added.numel()))
        return torch.cat([picks, fold[added]]), radius

    def _grid_keep(self, rows: torch.Tensor, stride: int) -> torch.Tensor:
        """Which of these row numbers (of whole units) are on every `stride`-th row and column of the patch grid."""
        h, w = self._fit_grid
        cell = rows % (h * w)
        return ((cell // w) % stride == 0) & ((cell % w) % stride == 0)

    def _continue_greedy(
        self, bank: torch.Tensor, rows: torch.Tensor, radius: float
    ) -> tuple[torch.Tensor, float, float]:
        """Greedy k-center continued from `bank` over new weighted `rows` (in the coreset's seeded
        projection) until every row is within `radius`: (indices of the picks into `rows`, their
        covering radius after, the farthest row's distance before)."""
        from kernels.coreset_cpu import greedy_kcenter_extend

        matrix = projection_matrix(rows.shape[1], self.cfg.projection_dim, torch.Generator().manual_seed(self.cfg.seed))
        proj_bank = bank @ matrix if matrix is not None else bank
        proj_new = rows @ matrix if matrix is not None else rows
        start_d, _ = KnnIndex.build(proj_bank, seed=self.cfg.seed).search(proj_new, 1)
        picks, after = greedy_kcenter_extend(proj_bank, proj_new, float(radius), min_d=start_d[:, 0])
        return picks, after, float(start_d.max()) if start_d.numel() else 0.0

    def layer_shares(self, embeddings: torch.Tensor, mode: str) -> torch.Tensor:
        """Each layer's share of the quantity `mode` balances (float64; ones for `none`)."""
        channels = list(self.extractor.channels)
        if mode == "variance":
            return self._layer_variances(embeddings, channels)
        if mode == "nearest":
            sample = self._share_sample(embeddings.shape[0])
            rows = embeddings if sample is None else embeddings[sample]
            picks, _ = self._select_coreset(rows, stride_rows=embeddings.shape[0], label="coreset (layer weights)")
            return self._layer_nearest_shares(rows, picks, channels)
        return torch.ones(len(channels), dtype=torch.float64)

    @staticmethod
    def _layer_variances(embeddings: torch.Tensor, channels: list[int]) -> torch.Tensor:
        """Each layer's summed column variances over the training patches (float64)."""
        total = torch.zeros(embeddings.shape[1], dtype=torch.float64)
        total_sq = torch.zeros_like(total)
        for start in range(0, embeddings.shape[0], 65536):
            chunk = embeddings[start : start + 65536].double()
            total += chunk.sum(0)
            total_sq += chunk.pow(2).sum(0)
        n = embeddings.shape[0]
        col_var = (total_sq - total.pow(2) / n) / max(1, n - 1)
        return torch.stack([part.sum() for part in col_var.split(channels)])

    def _layer_nearest_shares(self, embeddings: torch.Tensor, picks: torch.Tensor, channels: list[int]) -> torch.Tensor:
        """Each layer's mean squared part of the residual from a training patch left out of the
        coreset to its nearest coreset entry (a seeded sample of NEAREST_SAMPLE patches; float64)."""
        left_out = torch.ones(embeddings.shape[0], dtype=torch.bool)
        left_out[picks] = False
        rest = left_out.nonzero().squeeze(1)
        if rest.numel() == 0:
            return torch.ones(len(channels), dtype=torch.float64)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        sample = rest[torch.randperm(rest.numel(), generator=gen)[:NEAREST_SAMPLE]]
        bank = embeddings[picks].float().to(self.device)
        bank_sq = knn.sq_norms(bank)
        sums = torch.zeros(len(channels), dtype=torch.float64)
        for block in sample.split(4096):
            queries = embeddings[block].float().to(self.device)
            _, nearest = knn.topk(queries, bank, 1, bank_sq_norms=bank_sq)
            residual = (queries - bank[nearest[:, 0]]).double().cpu()
            sums += torch.stack([part.pow(2).sum() for part in residual.split(channels, 1)])
        return sums / sample.numel()

    def _share_sample(self, n_rows: int) -> torch.Tensor | None:
        """Rows of a seeded sample of NEAREST_UNITS training images (tiles), whole and in order, for
        the `nearest` layer shares; None: all rows (as few units or fewer, or no patch grid known)."""
        grid = getattr(self, "_fit_grid", None)
        if grid is None:
            return None
        per_unit = grid[0] * grid[1]
        n_units = n_rows // per_unit
        if n_units <= NEAREST_UNITS or n_units * per_unit != n_rows:
            return None
        gen = torch.Generator().manual_seed(self.cfg.seed)
        units = torch.randperm(n_units, generator=gen)[:NEAREST_UNITS].sort().values
        return (units[:, None] * per_unit + torch.arange(per_unit)).reshape(-1)

    def _layer_weights(self) -> list[float]:
        """One weight per layer (the fitted column weights are constant within a layer)."""
        firsts = torch.tensor([0, *self.extractor.channels[:-1]]).cumsum(0)
        return self.column_weights[firsts].tolist()

    def _set_column_weights(self, weights: torch.Tensor) -> None:
        self.column_weights = weights.float().cpu()
        # Unit weights (the default) cost nothing per batch; others are kept on the device, shaped.
        unit = bool((self.column_weights == 1).all())
        self._column_scale = None if unit else self.column_weights.to(self.device).view(1, -1, 1, 1)

    def _embed(self, feature_maps: list[torch.Tensor]) -> torch.Tensor:
        """Patch embeddings with the fitted column weights applied, (B, C, H, W) float32."""
        emb = patchcore_embedding(feature_maps).float()
        return emb if self._column_scale is None else emb * self._column_scale

    def _select_coreset(
        self, embeddings: torch.Tensor, stride_rows: int | None = None, label: str = "coreset"
    ) -> tuple[torch.Tensor, float]:
        """Greedy k-center on a seeded Gaussian random projection of the embeddings, among the
        candidate rows (all, or the thinned patch grid: coreset_candidates, its stride set as for
        `stride_rows` training patches: a sample of whole units thins as the full set does)."""
        n_total = embeddings.shape[0]
        n_keep = max(1, min(n_total, round(self.cfg.coreset_ratio * n_total)))
        candidates = self._coreset_candidates(n_total, stride_rows or n_total)
        if candidates is not None:
            embeddings = embeddings[candidates]
            n_keep = min(n_keep, embeddings.shape[0])
        if n_keep == embeddings.shape[0]:
            picks = torch.arange(n_keep)
            return (picks if candidates is None else candidates[picks]), 0.0
        projected, start = project_for_coreset(embeddings, self.cfg.projection_dim, self.cfg.seed)
        if self.device.type == "cuda":
            projected = projected.to(self.device)
        bar = self.step_bar(n_keep, label) if self.step_bar is not None else None
        done = [0]

        def advance(count: int) -> None:
            assert bar is not None
            bar.advance(count - done[0])
            done[0] = count

        picks, radius = coreset.greedy_kcenter_with_radius(
            projected, n_keep, start=start, progress=advance if bar is not None else None)
        if bar is not None:
            bar.close()
        picks = picks.cpu()
        return (picks if candidates is None else candidates[picks]), radius

    def _coreset_candidates(self, n_total: int, stride_rows: int) -> torch.Tensor | None:
        """Rows the coreset picks from when there are more than `coreset_candidates`: every s-th row
        and column of each image's (tile's) patch grid, s the smallest stride that brings them under
        the limit. Neighbouring patches overlap, so a thinned grid still has a row within one patch
        step of every patch; the picks are exact greedy k-center among the candidates (the covering
        radius over all rows is measured in benchmarks/coreset_thinning.py). None: all rows."""
        limit = self.cfg.coreset_candidates
        grid = getattr(self, "_fit_grid", None)
        if not limit or stride_rows <= limit or grid is None:
            return None
        h, w = grid
        stride = 2
        while stride_rows / stride**2 > limit and stride < min(h, w):
            stride += 1
        self.fit_stats["coreset_candidate_stride"] = stride
        return self._grid_keep(torch.arange(n_total), stride).nonzero().squeeze(1)

    def _set_bank(self, bank: torch.Tensor) -> None:
        self.bank = bank.contiguous().to(self.device)
        self.bank_sq_norms = knn.sq_norms(self.bank)  # once per bank, not per query batch
        self._index: KnnIndex | None = None
        self._support: torch.Tensor | None = None
        # The fused kernel's bf16 operand, padded to a multiple of 16 columns (Lite0's 152 -> 160), made once.
        self._bank_lowp = knn.lowp_bank(self.bank) if self.device.type == "cuda" else None

    def prepare_scoring(self) -> None:
        """Build the CPU index (and, for tiles, the bank's neighbour table) now, once, so threads that
        score at the same time share them."""
        if self.device.type != "cuda" and self._index is None:
            self._index = KnnIndex.build(self.bank, seed=self.cfg.seed, owner=self.bank_owner)
        if self.cfg.tile_size and self._support is None:
            self._support = self._neighbour_table()

    def _neighbour_table(self) -> torch.Tensor:
        """(M, k) the `num_neighbors` bank rows nearest each bank row (itself first): the support of
        the image-score reweighting, looked up per patch instead of searched per image."""
        k = min(self.cfg.num_neighbors, self.bank.shape[0])
        parts = [self.nearest(rows, k, self._support_owner(rows.shape[0]))[1]
                 for rows in self.bank.split(8192)]
        return torch.cat(parts)

    def _support_owner(self, n: int) -> torch.Tensor | None:
        """Query owners for the reweighting's support search: the fold's while it is scored as a group."""
        return torch.full((n,), FOLD_OWNER, dtype=torch.int32) if self._fold_out else None

    @contextmanager
    def out_of_sample(self, owners: Sequence[int], as_group: bool = False) -> Iterator[list[int]]:
        """Owner ids that score training images `owners` out of sample: each without its own rows, or
        (as_group) all of them without any of their rows, neighbour table included: a hold-out of
        the bank without them (a calibration fold fitted last, the images `vade update` added)."""
        if not as_group:
            yield list(owners)
            return
        if self.bank_owner is None:
            raise ValueError("this PatchCore model keeps no bank owners (fitted before owners were kept): "
                             "it cannot score leave-one-out; calibrate it on held-out images")
        kept = self.bank_owner
        group = torch.isin(kept, torch.as_tensor(list(owners), dtype=torch.int32))
        if bool(group.all()):
            raise ValueError("every bank row belongs to the images to hold out: nothing to score them against")
        self.bank_owner = torch.where(group, torch.tensor(FOLD_OWNER, dtype=torch.int32), kept)
        self._index, self._support, self._fold_out = None, None, True
        try:
            yield [FOLD_OWNER] * len(owners)
        finally:
            self.bank_owner = kept
            self._index, self._support, self._fold_out = None, None, False

    def nearest(
        self, rows: torch.Tensor, k: int, query_owner: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact k nearest bank rows: the fused kernel on CUDA, a pruned cell index on CPUs;
        `query_owner` (per row) excludes bank rows of that owner."""
        if self.device.type == "cuda":
            owners = {} if query_owner is None else dict(query_owner=query_owner, bank_owner=self.bank_owner)
            return knn.topk(rows, self.bank, k, bank_sq_norms=self.bank_sq_norms, bank_lowp=self._bank_lowp, **owners)
        if self._index is None:
            self._index = KnnIndex.build(self.bank, seed=self.cfg.seed, owner=self.bank_owner)
        return self._index.search(rows, k, query_owner=query_owner)

    def _row_owner(self, loo_owner: torch.Tensor | None, per_image: int) -> torch.Tensor | None:
        """Per-patch owners from per-image (tile) owners; None without leave-one-out."""
        if loo_owner is None:
            return None
        if self.bank_owner is None:
            raise ValueError("this PatchCore model keeps no bank owners (fitted before owners were kept): "
                             "it cannot score leave-one-out; calibrate it on held-out images")
        return torch.as_tensor(loo_owner, dtype=torch.int32).repeat_interleave(per_image)

    def score_features(self, feature_maps: list[torch.Tensor], loo_owner: torch.Tensor | None = None) -> ScoreOutput:
        emb = self._embed(feature_maps)
        b, c, h, w = emb.shape
        rows = to_rows(emb)
        dist, idx = self._nearest_row(rows, self._row_owner(loo_owner, h * w))
        patch_scores = dist.view(b, h * w)
        image_scores = self._reweighted_max(patch_scores, idx.view(b, h * w), rows.view(b, h * w, c))
        maps = grid_to_map(patch_scores.view(b, h, w), self.input_size, self.cfg.blur_sigma)
        return ScoreOutput(image_scores.float(), maps.float())

    def _nearest_row(self, rows: torch.Tensor, row_owner: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(dist, idx) (P,) of each row's nearest bank row, excluding `row_owner`'s rows."""
        dist, idx = self.nearest(rows, 1, row_owner)
        return dist[:, 0].contiguous(), idx[:, 0].contiguous()

    def _reweighted_max(self, patch_scores: torch.Tensor, nn_idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Max patch score times 1 - softmax(distances to the bank neighbours of its nearest entry)[0]."""
        batch = torch.arange(patch_scores.shape[0], device=patch_scores.device)
        worst = patch_scores.argmax(dim=1)
        score = patch_scores[batch, worst]
        if min(self.cfg.num_neighbors, self.bank.shape[0]) <= 1:
            return score
        k = min(self.cfg.num_neighbors, self.bank.shape[0])
        anchors = nn_idx[batch, worst]
        _, support = self.nearest(self.bank[anchors], k, self._support_owner(anchors.numel()))  # itself first
        return self._support_factor(rows[batch, worst], support) * score

    def _support_factor(self, rows: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """(P,) 1 - softmax(distances of each row (P, C) to its support rows (P, k) of the bank)[0]."""
        near = self.bank.index_select(0, support.reshape(-1)).view(*support.shape, self.bank.shape[1])
        dists = near.sub_(rows[:, None, :]).pow_(2).sum(2).sqrt_()
        return 1.0 - torch.softmax(dists, dim=1)[:, 0]

    def tile_grids(self, feature_maps: list[torch.Tensor], loo_owner: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 2, h, w): patch scores, and per patch the reweighting factor the image score applies
        when that patch is the worst (1 - softmax over its distances to its nearest entry's support)."""
        emb = self._embed(feature_maps)
        b, c, h, w = emb.shape
        rows = to_rows(emb)
        dist, idx = self._nearest_row(rows, self._row_owner(loo_owner, h * w))
        factor = torch.ones_like(dist)
        if min(self.cfg.num_neighbors, self.bank.shape[0]) > 1:
            self.prepare_scoring()
            assert self._support is not None
            for start in range(0, rows.shape[0], 512):  # blocks whose gathered rows stay in cache
                support = self._support[idx[start : start + 512]]  # (n, k), first is the entry itself
                factor[start : start + 512] = self._support_factor(rows[start : start + 512], support)
        return torch.stack([dist.view(b, h, w), factor.view(b, h, w)], dim=1).float()

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"bank": self.bank.detach().float().cpu().contiguous(), "column_weights": self.column_weights.contiguous()}
        if self.bank_owner is not None:
            out["bank_owner"] = self.bank_owner.to(torch.int32).cpu().contiguous()
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        owner = tensors.get("bank_owner")  # absent in files from before leave-one-out
        if owner is not None and owner.shape != tensors["bank"].shape[:1]:
            raise ValueError(f"bank_owner has {owner.shape[0]} rows, the bank {tensors['bank'].shape[0]}")
        self.bank_owner = None if owner is None else owner.to(torch.int32)
        self._set_bank(tensors["bank"].float())
        # Files from before layer balancing hold no weights: their banks are unweighted.
        self._set_column_weights(tensors.get("column_weights", torch.ones(self.bank.shape[1])))

    def extend_bank(self, rows: torch.Tensor, owners: torch.Tensor | None, grid: tuple[int, int]) -> dict:
        """`vade update`: continue the fit's greedy k-center from the current bank over new weighted
        patch rows (their distances to the bank are the starting minima) until every candidate is
        within the fit's covering radius; the picks join the bank. Returns what was done."""
        radius = self.fit_stats.get("coreset_covering_radius_projected")
        if radius is None:
            raise ValueError("this model records no coreset covering radius: refit it to update")
        self._fit_grid = grid
        candidates = torch.arange(rows.shape[0])
        candidates = candidates[self._grid_keep(candidates, int(self.fit_stats.get("coreset_candidate_stride", 1)))]
        bank = self.bank.float().cpu()
        picks, after, farthest = self._continue_greedy(bank, rows[candidates].float(), float(radius))
        added = candidates[picks]
        if owners is not None and self.bank_owner is not None:
            self.bank_owner = torch.cat([self.bank_owner, owners[added].to(torch.int32)])
        else:
            self.bank_owner = None
        self._set_bank(torch.cat([bank, rows[added].float()]))
        self.fit_stats["bank_size"] = int(self.bank.shape[0])
        self.fit_stats["training_patches"] = int(self.fit_stats.get("training_patches", 0)) + int(rows.shape[0])
        return {"patches": int(rows.shape[0]), "candidates": int(candidates.numel()), "added": int(added.numel()),
                "bank_size": int(self.bank.shape[0]), "covering_radius_projected": float(radius),
                "new_rows_radius_after": round(after, 6), "farthest_new_row_before": round(farthest, 6)}

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
    matrix = projection_matrix(feat_dim, dim, gen)
    if matrix is not None:
        projected = torch.cat([embeddings[i : i + 65536].float() @ matrix for i in range(0, n_total, 65536)])
    else:
        projected = embeddings.float()
    return projected, int(torch.randint(n_total, (1,), generator=gen))


def projection_matrix(feat_dim: int, dim: int, gen: torch.Generator) -> torch.Tensor | None:
    """The coreset's Gaussian projection (None: rows kept as they are), drawn first from `gen`."""
    if 0 < dim < feat_dim:
        return torch.randn(feat_dim, dim, generator=gen) / dim**0.5
    return None
