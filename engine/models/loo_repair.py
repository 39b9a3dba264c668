"""PatchCore leave-one-out with repair: per calibration image, the rows a fit without it would pick.

Removing an image's own rows from the bank leaves a hole: the other images' patches near them were
never picked, because its rows covered them, so its leave-one-out scores run higher than a new image's
(pcb, at a 5% target: 2.3% of the normal test images flagged). A fit without the image would have
picked some of those patches instead. The repair finds them the way the coreset would: the other
images' candidate rows whose nearest bank row is one of the image's (only those can lose their cover)
and that are farther than the covering radius r from the rest of the bank; the greedy k-center then continues from
the rest of the bank over them down to r (as `vade update` does). The image is scored against the bank
without its rows plus those picks: a bank of the other N - 1 images at the fit's covering radius, as a
new image meets one of N. The picks are not those of an actual refit (the greedy order differs), the
radius they reach is; all in the coreset's projected space, the rows kept at full dimension.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kernels.coreset_cpu import greedy_kcenter_extend
from kernels.knn_index import KnnIndex

PAIR_BLOCK = 4096  # candidate rows per distance block against the calibration images' bank rows


@dataclass
class RepairRows:
    """The repair picks of every calibration image, grouped by image."""

    rows: torch.Tensor  # (R, D) float32 weighted rows, as the bank's
    owner: torch.Tensor  # (R,) int32: the calibration image each row stands in for
    spans: dict[int, tuple[int, int]]  # owner -> [start, stop) in rows
    support: torch.Tensor | None = None  # (R, k) indices into cat(bank, rows): each row's neighbours, itself first


def find_repair_rows(
    embeddings: torch.Tensor, row_owner: torch.Tensor, picks: torch.Tensor, radius: float,
    images: Sequence[int], candidates: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor], seed: int,
) -> tuple[RepairRows, dict]:
    """The repair picks for `images` (owner ids) from the fit's weighted `embeddings`, their owners,
    the bank `picks`, its projected covering `radius` and the coreset's `candidates` (row numbers);
    `project` maps rows into the coreset's space. Returns (the rows, what was done)."""
    bank_owner = row_owner[picks]
    proj_bank = project(embeddings[picks])
    target = torch.as_tensor(sorted(set(images)), dtype=torch.int32)
    in_mine = torch.isin(bank_owner, target)
    proj_mine, mine_owner = proj_bank[in_mine], bank_owner[in_mine]
    mine_sq = proj_mine.pow(2).sum(1)
    # A candidate can lose its cover to image i only if its nearest bank row is one of i's: pair it
    # with the owner of its nearest calibration row, and keep it while the other calibration images'
    # rows leave it farther than the radius.
    pair_rows, pair_owner, pair_d2 = [], [], []
    for block in candidates.split(PAIR_BLOCK):
        rows = project(embeddings[block])
        d2 = rows.pow(2).sum(1)[:, None] + mine_sq[None, :] - 2.0 * rows @ proj_mine.T
        owner = mine_owner[d2.argmin(dim=1)]
        others = d2.masked_fill(mine_owner[None, :] == owner[:, None], float("inf")).amin(dim=1)
        keep = (owner != row_owner[block]) & (others > radius * radius)
        pair_rows.append(block[keep])
        pair_owner.append(owner[keep])
        pair_d2.append(others[keep])
    rows_of = torch.cat(pair_rows) if pair_rows else torch.zeros(0, dtype=torch.long)
    owner_of = torch.cat(pair_owner) if pair_owner else torch.zeros(0, dtype=torch.int32)
    others_d2 = torch.cat(pair_d2) if pair_d2 else torch.zeros(0)
    # ... and the distance to the bank outside every calibration image (one search, the group excluded)
    group = torch.where(in_mine, torch.tensor(-1, dtype=torch.int32), bank_owner)
    index = KnnIndex.build(proj_bank, seed=seed, owner=group)
    rest_d = torch.cat([index.search(project(embeddings[rows_of[i : i + 65536]]), 1,
                                     query_owner=torch.full((min(65536, rows_of.numel() - i),), -1, dtype=torch.int32)
                                     )[0][:, 0] for i in range(0, rows_of.numel(), 65536)]) if rows_of.numel() \
        else torch.zeros(0)
    rest_d = torch.minimum(rest_d, others_d2.clamp_min(0).sqrt())
    orphan = rest_d > radius
    parts, owners, spans, start = [], [], {}, 0
    for owner in torch.unique(owner_of[orphan]).tolist():
        sel = orphan & (owner_of == owner)
        rows = rows_of[sel]
        new, _ = greedy_kcenter_extend(proj_bank[bank_owner != owner], project(embeddings[rows]), radius,
                                       min_d=rest_d[sel])
        parts.append(embeddings[rows[new]].float())
        owners.append(torch.full((new.numel(),), owner, dtype=torch.int32))
        spans[int(owner)] = (start, start + new.numel())
        start += new.numel()
    dim = embeddings.shape[1]
    repair = RepairRows(torch.cat(parts) if parts else torch.zeros((0, dim)),
                        torch.cat(owners) if owners else torch.zeros(0, dtype=torch.int32), spans)
    return repair, {"loo_repair_checked": int(rows_of.numel()), "loo_repair_orphans": int(orphan.sum()),
                    "loo_repair_rows": int(repair.rows.shape[0]), "loo_repair_images": len(spans)}


def closer_repair_rows(
    rows: torch.Tensor, row_owner: torch.Tensor, dist: torch.Tensor, idx: torch.Tensor, repair: RepairRows,
    bank_rows: int,
) -> None:
    """Where a patch of a calibration image is nearer one of that image's repair rows than its bank
    neighbour, take that row (index bank_rows + its position); `dist` and `idx` (P,) change in place."""
    for owner in torch.unique(row_owner).tolist():
        if owner not in repair.spans:
            continue
        start, stop = repair.spans[owner]
        sel = (row_owner == owner).nonzero().squeeze(1)
        d, j = torch.cdist(rows[sel].float(), repair.rows[start:stop].to(rows.device)).min(dim=1)
        better = d < dist[sel]
        dist[sel[better]] = d[better].to(dist.dtype)
        idx[sel[better]] = bank_rows + start + j[better]
