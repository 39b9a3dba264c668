"""The CPU side of the CUDA feed, measured on this machine: per-stage cost per image and the loader's
images/s against the number of loader workers (engine/scan/cuda_feed.load_batches).

    python benchmarks/feed_cpu.py [--images 200] [--workers 1,2] [--repeats 3]

Sets: MVTec bottle (256 px RGB PNG), DeepPCB (256 px greyscale PNG), DeepPCB 640 (640 px PNG, resized
to 256) from ../shared/data, and the bottle images re-encoded as 256 px JPEG (quality 90, in a
temporary folder) for the nvjpeg path, whose CPU part is read + inspect + EXIF tag (the decode runs on
the GPU). Stage costs are single-thread medians over the set (wall = CPU here: files are in the page
cache after the first pass; CPU time of the measuring thread, so a shared machine's load matters little).
The loader's images/s by worker count is wall time, with the load average recorded beside it. Writes benchmarks/results/feed_cpu.json; docs/gpu_feed.md puts these
beside the H200 budget.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks._env import write_result  # noqa: E402
from engine.inputs.decode import decode_pillow, resize_batch  # noqa: E402
from engine.inputs.decoders import PillowDecoder, exif_orientation  # noqa: E402
from engine.inputs.inspection import inspect_bytes, read_bytes  # noqa: E402
from engine.inputs.sources import Record, Shard  # noqa: E402
from engine.scan.cuda_feed import load_batches  # noqa: E402

DATA = (REPO / ".." / "shared" / "data").resolve()
SETS = {
    "bottle 256 px RGB PNG": "mvtec_bottle/bottle/train/good/*.png",
    "deeppcb 256 px L PNG": "deeppcb/pcb/train/*/*",
    "deeppcb 640 px L PNG -> 256": "deeppcb_640/pcb/train/*/*",
}
SIZE = 256


def per_image_us(fn, items) -> float:
    """Median over three passes of the mean CPU microseconds (this thread's) per item: on a shared
    machine wall time depends on the other processes, this thread's CPU time much less."""
    runs = []
    for _ in range(3):
        t = time.thread_time()
        for item in items:
            fn(item)
        runs.append((time.thread_time() - t) / len(items) * 1e6)
    return round(statistics.median(runs), 1)


def stage_costs(files: list[Path], jpeg: bool) -> dict[str, float]:
    blobs = [read_bytes(f) for f in files]
    suffix = files[0].suffix
    infos = [inspect_bytes(b, suffix) for b in blobs]
    costs = {"read_bytes": per_image_us(read_bytes, files), "inspect_bytes": per_image_us(lambda b: inspect_bytes(b, suffix), blobs)}
    if jpeg:
        costs["exif_orientation (nvjpeg path)"] = per_image_us(exif_orientation, blobs)
    costs["decode_pillow"] = per_image_us(decode_pillow, blobs)
    pixels = [torch.from_numpy(decode_pillow(b)) for b in blobs]
    costs["resize_batch (per image, batches of 32)"] = round(
        per_image_us(lambda i: resize_batch(pixels[i : i + 32], SIZE), range(0, len(pixels), 32)) * len(range(0, len(pixels), 32)) / len(pixels), 1
    )
    costs["sum"] = round(sum(costs.values()), 1)
    costs["images"] = len(files)
    costs["source pixels"] = f"{infos[0].width}x{infos[0].height} {infos[0].mode}"
    return costs


def loader_rate(files: list[Path], workers: int, repeats: int) -> dict[str, float]:
    records = [Record(i, str(f), str(f)) for i, f in enumerate(files)]
    shard = Shard(0, 0, records)
    batches = [(shard, records[s : s + 32], s + 32 >= len(records)) for s in range(0, len(records), 32)]
    rates, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        n = sum(len(b.ok) for b in load_batches(iter(batches), lambda: PillowDecoder(torch.device("cpu")), SIZE, 10**9,
                                                torch.device("cpu"), workers))  # fmt: skip
        wall = time.perf_counter() - t
        rates.append(n / wall)
        cpu.append((time.process_time() - c) / n * 1e6)
    return {"images_per_s": round(statistics.median(rates), 1), "cpu_us_per_image": round(statistics.median(cpu), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    workers = [int(w) for w in args.workers.split(",")]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sets = {name: sorted(DATA.glob(pattern))[: args.images] for name, pattern in SETS.items()}
        jpegs = []
        for f in sets["bottle 256 px RGB PNG"]:
            out = Path(tmp) / (f.stem + ".jpg")
            buf = io.BytesIO()
            Image.open(f).convert("RGB").save(buf, "JPEG", quality=90)
            out.write_bytes(buf.getvalue())
            jpegs.append(out)
        sets["bottle 256 px JPEG q90 (nvjpeg input)"] = jpegs
        for name, files in sets.items():
            if not files:
                print(f"skip {name}: no files under {DATA}")
                continue
            jpeg = files[0].suffix == ".jpg"
            entry = {"stages_us_per_image": stage_costs(files, jpeg)}
            if jpeg:
                entry["nvjpeg path CPU us per image (read + inspect + EXIF tag)"] = round(
                    sum(entry["stages_us_per_image"][k] for k in ("read_bytes", "inspect_bytes", "exif_orientation (nvjpeg path)")), 1)
            entry["loader (Pillow decode + resize), by workers"] = {w: loader_rate(files, w, args.repeats) for w in workers}
            results[name] = entry
            print(name, entry, flush=True)
    import os

    load = [round(x, 2) for x in os.getloadavg()]
    path = write_result("feed_cpu.json", {"size": SIZE, "batch": 32, "load_average_after": load, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
