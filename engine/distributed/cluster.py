"""Where a distributed scan runs: local worker processes, one worker per GPU, or a running Dask scheduler.

    with connect(ClusterRequest(workers=2)) as client: ...          # 2 local processes, 1 thread each
    with connect(ClusterRequest(gpus="all")) as client: ...         # one local worker per visible GPU
    with connect(ClusterRequest(scheduler="tcp://host:8786")) as client: ...   # workers started elsewhere

Local workers are Nanny-supervised processes (a worker that dies is restarted) with one task thread
each, so when a worker dies only the shard it was running is suspect (see engine.distributed.driver). CPU
workers run torch with one thread (start as many workers as cores); GPU workers share the cores.
Without dask-cuda, each GPU worker is pinned by CUDA_VISIBLE_DEVICES=<its GPU> in its environment from
the start, so it sees its GPU as cuda:0 and no other; dask-cuda's LocalCUDACluster pins the same way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
from distributed import Client, Nanny, Scheduler, SpecCluster, WorkerPlugin

from engine.errors import ConfigError

NANNY_ENV, MALLOC_TRIM = "distributed.nanny.pre-spawn-environ", "MALLOC_TRIM_THRESHOLD_"
LOCAL_ALLOWED_FAILURES = 2  # worker deaths one task may cause on a local cluster before it is split
# --workers N: one torch thread per worker process (use N = cores). torch's CPU sums depend on the thread
# count, so this keeps results bitwise the same for any N; and two-thread workers ran at half the speed
# of one-thread ones on a loaded 2-core machine (benchmarks/results/dask_scaling.json).
CPU_WORKER_THREADS = 1
CONNECT_TIMEOUT_S = 30


@dataclass(frozen=True)
class ClusterRequest:
    """One of: `workers` local processes, `gpus` ("all" or a count), or a `scheduler` address / JSON file."""

    workers: int | None = None
    gpus: str | None = None
    scheduler: str | None = None
    torch_threads: int | None = None  # per local worker; default 1 for --workers, cores // GPUs for --gpus
    allowed_failures: int = LOCAL_ALLOWED_FAILURES
    quiet_logs: bool = True  # keep Dask's own log lines (worker restarts...) off the terminal
    connect_timeout_s: float = CONNECT_TIMEOUT_S  # --scheduler: how long to keep trying to reach it

    def validate(self) -> None:
        given = [name for name in ("workers", "gpus", "scheduler") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ConfigError(f"give exactly one of --workers, --gpus, --scheduler; got {given or 'none'}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise ConfigError(f"--workers must be an integer >= 1, got {self.workers!r}")
        if self.gpus is not None and self.gpus != "all" and not (str(self.gpus).isdigit() and int(self.gpus) >= 1):
            raise ConfigError(f"--gpus must be 'all' or a number of GPUs >= 1, got {self.gpus!r}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"torch_threads must be >= 1, got {self.torch_threads!r}")
        if self.allowed_failures < 0:
            raise ConfigError(f"allowed_failures must be >= 0, got {self.allowed_failures!r}")

    @property
    def worker_device(self) -> str | None:
        """The device every worker must use, when the request fixes it (GPU workers: their own cuda:0)."""
        return "cuda" if self.gpus is not None else None


def visible_gpus(spec: str, visible: str | None, device_count: int) -> list[str]:
    """GPU ids for `--gpus all|N`: from CUDA_VISIBLE_DEVICES when set (`visible`), else 0..device_count-1."""
    if visible is not None and visible.strip() not in ("", "-1"):
        ids = [part.strip() for part in visible.split(",") if part.strip()]
    elif visible is not None:
        ids = []  # CUDA_VISIBLE_DEVICES="" or "-1" hides every GPU
    else:
        ids = [str(i) for i in range(device_count)]
    if not ids:
        raise ConfigError(
            "--gpus: no GPU is visible (torch finds none, or CUDA_VISIBLE_DEVICES hides them all); "
            "use --workers N for CPU worker processes"
        )
    if spec == "all":
        return ids
    wanted = int(spec)
    if wanted > len(ids):
        raise ConfigError(f"--gpus {wanted}: only {len(ids)} GPU(s) visible ({','.join(ids)}); use --gpus all")
    return ids[:wanted]


def pinned_envs(gpu_ids: list[str]) -> list[dict[str, str]]:
    """One environment per worker: each sees exactly its own GPU (as cuda:0)."""
    return [{"CUDA_VISIBLE_DEVICES": gpu} for gpu in gpu_ids]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_torch_threads(workers: int, cores: int | None = None) -> int:
    """CPU threads for torch in each of `workers` processes sharing this machine's cores."""
    return max(1, (cores or usable_cores()) // workers)


class WorkerSetup(WorkerPlugin):
    """Runs in every worker process when it starts (restarted ones too): torch's CPU thread count.

    A fixed count per worker keeps CPU results bitwise stable: float sums in torch's CPU kernels
    depend on how many threads split them, not on which worker runs a shard.
    """

    name = "vade-worker-setup"

    def __init__(self, torch_threads: int):
        self.torch_threads = torch_threads

    def setup(self, worker: Any) -> None:
        import torch

        torch.set_num_threads(self.torch_threads)

    def teardown(self, worker: Any) -> None:
        from engine.distributed.worker import drop_models

        drop_models()


def _local_cluster(envs: list[dict[str, str]], request: ClusterRequest, torch_threads: int) -> SpecCluster:
    """Nanny-supervised worker processes on 127.0.0.1, one task thread each, worker i with environment envs[i].

    OpenMP/MKL see `torch_threads` from the start (Dask's nanny would otherwise start them with 1).
    """
    threads = {"OMP_NUM_THREADS": str(torch_threads), "MKL_NUM_THREADS": str(torch_threads)}
    from distributed.system import MEMORY_LIMIT

    log_level = logging.CRITICAL if request.quiet_logs else logging.WARNING
    scheduler = {
        "cls": Scheduler,
        "options": {
            "host": "127.0.0.1",
            "port": 0,
            "dashboard": False,
            "dashboard_address": ":0",  # its small HTTP server (health, metrics) on a free port, not 8787
            "allowed_failures": request.allowed_failures,
        },
    }
    workers = {
        f"vade-{i}": {
            "cls": Nanny,
            "options": {
                "host": "127.0.0.1",
                "nthreads": 1,
                "memory_limit": MEMORY_LIMIT // len(envs),  # an even share: GPU workers need host RAM too
                "silence_logs": log_level,
                "dashboard": False,
                "env": {**threads, **env},
                "name": f"vade-{i}",
            },
        }
        for i, env in enumerate(envs)
    }
    # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which turns off glibc's adaptive mmap
    # threshold: every tensor-sized allocation becomes an mmap + page faults. A scan then costs ~45% more
    # CPU (measured: same scan, one process, with and without it). Unset it for vade's workers.
    with dask.config.set({f"{NANNY_ENV}.{MALLOC_TRIM}": None}):
        return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=log_level, name="vade")


def _cuda_cluster(gpu_ids: list[str], request: ClusterRequest) -> Any:
    """dask-cuda's LocalCUDACluster over `gpu_ids`, or None when dask-cuda is not installed."""
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        return None
    return LocalCUDACluster(
        CUDA_VISIBLE_DEVICES=gpu_ids,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.CRITICAL if request.quiet_logs else logging.WARNING,
        scheduler_kwargs={"allowed_failures": request.allowed_failures},
    )


def _gpu_ids(spec: str) -> list[str]:
    import torch

    return visible_gpus(spec, os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())


@contextmanager
def connect(request: ClusterRequest) -> Iterator[Client]:
    """A client on the requested cluster, with WorkerSetup registered; a local cluster is closed after."""
    request.validate()
    cluster: Any = None
    if request.scheduler is not None:
        client = _remote_client(request.scheduler, request.connect_timeout_s)
        # None: leave remote workers as started (Dask's nanny gives them OMP_NUM_THREADS=1: one torch thread)
        threads = request.torch_threads
    else:
        gpu_ids = _gpu_ids(request.gpus) if request.gpus is not None else None
        count = len(gpu_ids) if gpu_ids else int(request.workers or 1)
        threads = request.torch_threads or (default_torch_threads(count) if gpu_ids else CPU_WORKER_THREADS)
        if gpu_ids:
            cluster = _cuda_cluster(gpu_ids, request) or _local_cluster(pinned_envs(gpu_ids), request, threads)
        else:
            cluster = _local_cluster([{} for _ in range(count)], request, threads)
        client = Client(cluster)
    try:
        if threads is not None:
            client.register_plugin(WorkerSetup(threads), name=WorkerSetup.name)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _remote_client(address: str, timeout_s: float) -> Client:
    is_file = Path(address).suffix == ".json" and Path(address).is_file()
    try:
        if is_file:
            return Client(scheduler_file=address, timeout=timeout_s)
        return Client(address, timeout=timeout_s)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ConfigError(
            f"cannot reach the Dask scheduler at {address!r}: {exc}. Start one with `dask scheduler` and "
            "workers with `dask worker ADDRESS --nthreads 1`, and pass its address (tcp://HOST:8786) or its "
            "--scheduler-file JSON"
        ) from exc
