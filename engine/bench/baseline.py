"""The peers' way on the same images, in the same run: Pillow decode + resize, an fp32 backbone in
NCHW with BatchNorm kept (Lite0: the package's own modules, unfused), `torch.cdist` brute-force
nearest neighbours against the model's bank, the image score reweighted as PatchCore's eq. 7, and the
map upsampled then blurred at full size (engine.features.maps.grid_to_map_direct, same sigma).

Tiled models the same way tile by tile: Pillow decode and resize to the layout's scaled size, the
layout's tiles, the fp32 backbone, `torch.cdist` patch distances against the whole bank and each
patch's reweighting factor (1 - softmax over its distances to its nearest row's neighbours, from a
neighbour table made once by brute force), grids blended as vade blends them, the map upsampled to the
full padded image, cropped, blurred at full size and resized to the map.

It computes what vade computes (PatchCore); its raw image scores are compared with the
scan's at three depths: the peer pipeline end to end (Pillow's resize differs from vade's antialiased
torch resize, and a model fitted in bf16 runs its backbone in bf16 where the peers' is fp32); the
peer backbone + cdist on vade's own resized pixels (the backbone's precision alone); and cdist on the
model's own features (the same inputs and features: what is left is the rounding of the two searches,
which says whether vade's pruned kNN search is exact).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from engine.features.embeddings import to_rows
from engine.features.maps import grid_to_map_direct

BATCH = 8
SAME_PIXELS_IMAGES = 32  # images of the same-pixels check


class PeerLite0(nn.Module):
    """EfficientNet-Lite0 from efficientnet_lite_pytorch, BatchNorm unfolded, cut at the asked stages."""

    def __init__(self, layers: list[str], weights: str | None, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        from engine.features.backbones import (
            LITE0_STAGE_REPEATS,
            _lite0_weights_path,
            load_state_dict,
            read_weights,
        )

        net = EfficientNet.from_name("efficientnet-lite0")
        load_state_dict(net, read_weights(_lite0_weights_path(Path(weights) if weights else None)), "efficientnet_lite0")
        net.eval()
        ends = torch.tensor(LITE0_STAGE_REPEATS).cumsum(0).tolist()
        wanted = [int(name.split(".")[1]) for name in layers]
        self.net, self.order = net, wanted
        self.taps = {ends[s] - 1: s for s in wanted}
        self.last = ends[max(wanted)]
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        x = (images - self.mean) / self.std
        x = net._swish(net._bn0(net._conv_stem(x)))
        found = {}
        for i, block in enumerate(net._blocks[: self.last]):
            x = block(x)
            if i in self.taps:
                found[self.taps[i]] = x
        return [found[s] for s in self.order]


def peer_backbone(model: Any) -> nn.Module:
    """The model's backbone the way a peer runs it: fp32, NCHW, unfused where a peer's would be."""
    extractor = model.extractor
    if model.cfg.backbone == "efficientnet_lite0":
        return PeerLite0(list(model.cfg.layers), model.cfg.weights, extractor.mean.float().cpu(), extractor.std.float().cpu())
    return extractor.float().to(memory_format=torch.contiguous_format)


def pillow_batch(paths: Sequence[Path], size: int) -> torch.Tensor:
    """Pillow decode + bilinear resize (Pillow's own, as the peers' torchvision transforms do) -> (B, 3, S, S)."""
    arrays = []
    for path in paths:
        with Image.open(path) as img:
            arrays.append(np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR)))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)


def cdist_scores(model: Any, feature_maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw image scores (B,), patch score grids (B, h, w)) by brute force: torch.cdist against the whole bank."""
    emb = model._embed(feature_maps)
    b, c, h, w = emb.shape
    rows = to_rows(emb)
    bank = model.bank.float()
    dist = torch.cdist(rows, bank)  # (B*h*w, M)
    patch_d, nn_idx = dist.min(dim=1)
    patch = patch_d.view(b, h * w)
    worst = patch.argmax(dim=1)
    batch = torch.arange(b, device=rows.device)
    score = patch[batch, worst]
    k = min(model.cfg.num_neighbors, bank.shape[0])
    if k > 1:
        anchor = bank[nn_idx.view(b, h * w)[batch, worst]]  # the nearest bank row of each image's worst patch
        support = torch.cdist(anchor, bank).topk(k, largest=False).indices  # (B, k), the row itself first
        worst_rows = rows.view(b, h * w, c)[batch, worst]
        dists = torch.cdist(worst_rows[:, None, :], bank[support]).squeeze(1)  # (B, k)
        score = (1.0 - F.softmax(dists, dim=1)[:, 0]) * score
    return score, patch.view(b, h, w)


def peer_maps(model: Any, grids: torch.Tensor) -> torch.Tensor:
    """Patch grids upsampled to the input and Gaussian-blurred at full size, as the peers make maps."""
    return grid_to_map_direct(grids, model.input_size, model.cfg.blur_sigma)


def supported(model: Any) -> str | None:
    """Why the baseline cannot run on this model, or None."""
    if model.method != "patchcore":
        return f"the baseline is PatchCore's (cdist nearest neighbours); this model is {model.method}"
    return None


def cdist_neighbour_table(bank: torch.Tensor, k: int) -> torch.Tensor:
    """(M, k) each bank row's k nearest bank rows (itself first) by torch.cdist, in blocks of rows."""
    return torch.cat([torch.cdist(bank[i : i + 2048], bank).topk(k, largest=False).indices
                      for i in range(0, bank.shape[0], 2048)])


def cdist_tile_grids(model: Any, feature_maps: list[torch.Tensor], support: torch.Tensor | None) -> torch.Tensor:
    """(B, 2, h, w) patch distances by torch.cdist against the whole bank and the reweighting factor
    per patch (`support`: the bank's neighbour table; None: no reweighting), as model.tile_grids gives."""
    emb = model._embed(feature_maps)
    b, c, h, w = emb.shape
    rows = to_rows(emb)
    bank = model.bank.float()
    patch_d, nn_idx = torch.cdist(rows, bank).min(dim=1)
    factor = torch.ones_like(patch_d)
    if support is not None:
        dists = torch.linalg.vector_norm(bank[support[nn_idx]] - rows[:, None, :], dim=2)
        factor = 1.0 - F.softmax(dists, dim=1)[:, 0]
    return torch.stack([patch_d.view(b, h, w), factor.view(b, h, w)], dim=1)


def pillow_scaled(path: Path, layout_of: Any) -> tuple[torch.Tensor, Any]:
    """Pillow decode and bilinear resize to the tile layout's scaled size: (uint8 (3, h, w), layout)."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
        layout = layout_of(rgb.height, rgb.width)
        if (layout.scaled_h, layout.scaled_w) != (rgb.height, rgb.width):
            rgb = rgb.resize((layout.scaled_w, layout.scaled_h), Image.BILINEAR)
        return torch.from_numpy(np.asarray(rgb)).permute(2, 0, 1), layout


def peer_tiled_map(stitched: torch.Tensor, layout: Any, sigma: float) -> torch.Tensor:
    """The stitched patch grid upsampled to the full padded image, cropped to it, blurred at full size
    and resized to the map (the peers untile maps at full resolution)."""
    from engine.features.maps import gaussian_blur

    stride = layout.spec.stride
    gh, gw = stitched.shape
    full = F.interpolate(stitched[None, None], size=(gh * stride, gw * stride), mode="bilinear", align_corners=False)
    image = gaussian_blur(full[0, :, : layout.scaled_h, : layout.scaled_w], sigma)
    return F.interpolate(image[None], size=(layout.map_h, layout.map_w), mode="bilinear", align_corners=False)[0, 0]


def _run_tiled(model: Any, paths: Sequence[Path], backbone: nn.Module,
               times: dict[str, float], scores: dict[str, float]) -> None:
    """The tiled baseline over `paths`, adding to `times` and `scores` (batches of BATCH tiles per image)."""
    from engine.features.stitch import GridStitcher
    from engine.inputs.decode import cut_tiles

    device, spec = model.device, model.tile_spec
    k = min(model.cfg.num_neighbors, model.bank.shape[0])
    t0 = time.perf_counter()
    support = cdist_neighbour_table(model.bank.float(), k) if k > 1 else None
    times["neighbour_table_once"] = time.perf_counter() - t0
    for path in paths:
        t0 = time.perf_counter()
        image, layout = pillow_scaled(path, spec.layout)
        stitcher = GridStitcher(layout)
        times["decode_resize"] += time.perf_counter() - t0
        for first in range(0, layout.n_tiles, BATCH):
            t0 = time.perf_counter()
            tiles = cut_tiles(image, layout, first, min(BATCH, layout.n_tiles - first)).to(device)
            _sync(device)
            t1 = time.perf_counter()
            fmaps = backbone(tiles)
            _sync(device)
            t2 = time.perf_counter()
            grids = cdist_tile_grids(model, fmaps, support)
            for j in range(grids.shape[0]):
                stitcher.add(first + j, grids[j])
            _sync(device)
            t3 = time.perf_counter()
            times["decode_resize"] += t1 - t0
            times["backbone"] += t2 - t1
            times["scoring"] += t3 - t2
        t0 = time.perf_counter()
        stitched = stitcher.result()
        valid_h, valid_w = layout.valid_cells
        cells = stitched[0, :valid_h, :valid_w].reshape(-1)
        worst = int(cells.argmax())
        scores[str(path)] = float(cells[worst] * stitched[1, :valid_h, :valid_w].reshape(-1)[worst])
        peer_tiled_map(stitched[0], layout, model.cfg.blur_sigma).cpu()
        times["map"] += time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_whole(model: Any, paths: Sequence[Path], backbone: nn.Module,
               times: dict[str, float], scores: dict[str, float]) -> None:
    """The whole-image baseline over `paths` in batches of BATCH, adding to `times` and `scores`."""
    size, device = model.input_size, model.device
    for start in range(0, len(paths), BATCH):
        chunk = list(paths[start : start + BATCH])
        t0 = time.perf_counter()
        images = pillow_batch(chunk, size).to(device)
        _sync(device)
        t1 = time.perf_counter()
        fmaps = backbone(images)
        _sync(device)
        t2 = time.perf_counter()
        raw, grids = cdist_scores(model, fmaps)
        _sync(device)
        t3 = time.perf_counter()
        peer_maps(model, grids).cpu()
        t4 = time.perf_counter()
        times["decode_resize"] += t1 - t0
        times["backbone"] += t2 - t1
        times["scoring"] += t3 - t2
        times["map"] += t4 - t3
        scores.update({str(p): float(s) for p, s in zip(chunk, raw.tolist(), strict=True)})


def run_baseline(model: Any, paths: Sequence[Path]) -> dict[str, Any]:
    """Score `paths` the peers' way on the model's device; per stage seconds, images/s, raw scores by path."""
    backbone = peer_backbone(model).to(model.device)
    times = {"decode_resize": 0.0, "backbone": 0.0, "scoring": 0.0, "map": 0.0}
    scores: dict[str, float] = {}
    t_start = time.perf_counter()
    with torch.inference_mode():
        (_run_tiled if model.tile_spec is not None else _run_whole)(model, paths, backbone, times, scores)
    wall = time.perf_counter() - t_start
    return {"seconds": wall, "images_per_s": len(paths) / wall if wall > 0 else None,
            "stages": {k: round(v, 4) for k, v in times.items()}, "scores": scores}  # fmt: skip


def same_pixels_scores(model: Any, paths: Sequence[Path]) -> tuple[dict[str, float], dict[str, float]]:
    """Raw scores by torch.cdist on vade's own decoded and resized pixels: (with the peer fp32 backbone,
    with the model's own backbone at its precision). The second isolates the search and scoring."""
    from engine.inputs.decode import read_rgb, to_tensor

    backbone = peer_backbone(model).to(model.device)
    peer: dict[str, float] = {}
    own: dict[str, float] = {}
    if model.tile_spec is not None:
        return _same_pixels_tiled(model, paths, backbone)
    with torch.inference_mode():
        for start in range(0, len(paths), BATCH):
            chunk = list(paths[start : start + BATCH])
            images = to_tensor([read_rgb(p) for p in chunk], model.input_size).to(model.device)
            for out, fmaps in ((peer, backbone(images)), (own, model.features(images))):
                raw, _ = cdist_scores(model, fmaps)
                out.update({str(p): float(s) for p, s in zip(chunk, raw.tolist(), strict=True)})
    return peer, own


def _same_pixels_tiled(model: Any, paths: Sequence[Path], backbone: nn.Module) -> tuple[dict[str, float], dict[str, float]]:
    """same_pixels_scores for a tiled model: vade's decoded, scaled and cut tiles, cdist grids, vade's stitching."""
    from engine.features.stitch import GridStitcher
    from engine.inputs.decode import pixels_tensor, read_rgb, tile_chunks

    k = min(model.cfg.num_neighbors, model.bank.shape[0])
    support = cdist_neighbour_table(model.bank.float(), k) if k > 1 else None
    peer: dict[str, float] = {}
    own: dict[str, float] = {}
    with torch.inference_mode():
        for path in paths:
            pixels = pixels_tensor(read_rgb(path))
            layout = model.tile_spec.layout(int(pixels.shape[0]), int(pixels.shape[1]))
            stitchers = {"peer": GridStitcher(layout), "own": GridStitcher(layout)}
            for first, chunk in tile_chunks(pixels, layout, BATCH):
                chunk = chunk.to(model.device)
                for name, fmaps in (("peer", backbone(chunk)), ("own", model.features(chunk))):
                    grids = cdist_tile_grids(model, fmaps, support)
                    for j in range(grids.shape[0]):
                        stitchers[name].add(first + j, grids[j])
            for name, out in (("peer", peer), ("own", own)):
                out[str(path)] = float(model.finish_tiled(stitchers[name].result(), layout).score)
    return peer, own


def agreement(reference: dict[str, float], other: dict[str, float]) -> dict[str, Any]:
    """Max and mean absolute (and max relative) difference of raw scores over the paths both have."""
    common = sorted(set(reference) & set(other))
    if not common:
        return {"images": 0}
    a = np.array([reference[p] for p in common], dtype=np.float64)
    b = np.array([other[p] for p in common], dtype=np.float64)
    diff = np.abs(a - b)
    return {"images": len(common), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "max_rel_diff": float((diff / np.maximum(np.abs(a), 1e-12)).max())}  # fmt: skip
