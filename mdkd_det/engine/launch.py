"""Multi-process launch (detectron2's ``engine/launch.py`` role) and DDP wrapping.

Two ways to run ``main_func`` on several processes:

- :func:`launch` spawns ``num_gpus_per_machine`` workers per machine with
  ``torch.multiprocessing.spawn`` and initialises ``torch.distributed`` (backend ``nccl`` if
  CUDA is available, else ``gloo``). On a CPU-only machine ``num_gpus_per_machine`` is the
  number of CPU processes.
- Started by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the environment):
  :func:`launch` initialises from the environment (``init_method="env://"``) and calls
  ``main_func`` directly in the current process.

Spawned workers exit within about a second when their launcher dies, even by ``kill -9``
(:func:`exit_with_parent`), so no orphan trains on and writes checkpoints.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..utils.errors import ConfigError, MdkdError, user_message
from ..utils import comm

__all__ = ["launch", "create_ddp_model", "find_free_port", "DEFAULT_TIMEOUT"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read, close)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
    finally:
        sock.close()


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _started_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def _limit_cpu_threads(procs_per_machine: int) -> None:
    """Share the CPU cores among CPU worker processes (as torchrun does with OMP_NUM_THREADS=1),
    unless the user chose ``OMP_NUM_THREADS``."""
    if torch.cuda.is_available() or procs_per_machine <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // procs_per_machine))


def launch(
    main_func: Callable[..., Any],
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = "auto",
    args: Sequence[Any] = (),
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Run ``main_func(*args)`` on ``num_gpus_per_machine * num_machines`` processes.

    Args:
        main_func: a module-level (picklable) function.
        num_gpus_per_machine: processes on this machine (GPUs; CPU processes without CUDA).
        num_machines: machines in the job.
        machine_rank: this machine's index (0 .. num_machines - 1).
        dist_url: ``torch.distributed`` init method, e.g. ``tcp://10.0.0.1:29500``; ``"auto"``
            -> ``tcp://127.0.0.1:<free port>`` (single machine only).
        args: positional arguments of ``main_func`` (picklable).
        timeout: collective timeout.

    With world size 1 (and no torchrun environment) ``main_func`` runs in this process without
    ``torch.distributed``. A worker's exception is re-raised here by ``mp.spawn``.

    Raises:
        ConfigError: ``dist_url="auto"`` with several machines, bad counts/ranks, or more GPU
            processes than visible GPUs.
    """
    if _started_by_torchrun():
        if int(os.environ["WORLD_SIZE"]) != num_gpus_per_machine * num_machines:
            logger.info("Started by torchrun: WORLD_SIZE=%s overrides --num-gpus/--num-machines",
                        os.environ["WORLD_SIZE"])
        _run_from_env(main_func, args, timeout)
        return
    if num_gpus_per_machine < 1 or num_machines < 1:
        raise ConfigError(f"--num-gpus ({num_gpus_per_machine}) and --num-machines ({num_machines}) must be >= 1")
    if not 0 <= machine_rank < num_machines:
        raise ConfigError(f"--machine-rank {machine_rank} must be in [0, {num_machines})")
    world_size = num_gpus_per_machine * num_machines
    if world_size == 1:
        main_func(*args)
        return
    if dist_url == "auto":
        if num_machines != 1:
            raise ConfigError("--dist-url auto only works on one machine; give tcp://<host of rank 0>:<port>")
        dist_url = f"tcp://127.0.0.1:{find_free_port()}"
    if torch.cuda.is_available() and num_gpus_per_machine > torch.cuda.device_count():
        raise ConfigError(f"--num-gpus {num_gpus_per_machine} > {torch.cuda.device_count()} visible GPUs")
    try:
        mp.spawn(
            _distributed_worker,
            nprocs=num_gpus_per_machine,
            args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, tuple(args), timeout,
                  os.getpid()),
            daemon=False,
        )
    except mp.ProcessExitedException as e:
        if e.exit_code == _BAD_INPUT_STATUS:
            raise WorkerReportedError(f"worker process {e.error_index} stopped on bad input") from None
        raise


#: Exit status of a worker that printed a one-line MdkdError (the CLI's "bad input" status).
_BAD_INPUT_STATUS = 2


class WorkerReportedError(MdkdError):
    """A spawned worker stopped on an :class:`MdkdError` and already printed its one-line
    message (``error: ...``) on stderr; the CLI exits with status 2 without printing more."""

    reported = True


#: Seconds between two checks of the parent-death watchdog (:func:`exit_with_parent`).
PARENT_POLL_S = 1.0


def exit_with_parent(parent_pid: int, poll_s: float = PARENT_POLL_S) -> None:
    """Make this worker process end when its launcher ``parent_pid`` dies (also by ``kill -9``),
    instead of training on to the end as an orphan and writing ``model_final.pth``.

    Two mechanisms: on Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (the kernel kills this process
    the moment its parent exits; via ``ctypes``), and on every platform a daemon thread that
    checks ``os.getppid()`` every ``poll_s`` seconds and calls ``os._exit(1)`` once the process
    was re-parented. Either way the worker is gone within about ``poll_s`` seconds. Checkpoints
    are written atomically, so a worker killed mid-write leaves no broken file (only a ``*.tmp``,
    removed on the next start).
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no libc/prctl: the watchdog below still works
            pass
    if os.getppid() != parent_pid:  # the launcher died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent_pid:
                logger.error("launcher process %d died; worker %d exits", parent_pid, os.getpid())
                os._exit(1)

    threading.Thread(target=watch, name="mdkd-parent-watchdog", daemon=True).start()


def _distributed_worker(local_rank: int, main_func, world_size: int, num_per_machine: int, machine_rank: int,
                        dist_url: str, args: tuple, timeout: datetime.timedelta, parent_pid: int) -> None:
    exit_with_parent(parent_pid)
    global_rank = machine_rank * num_per_machine + local_rank
    comm._LOCAL_RANK, comm._LOCAL_SIZE = local_rank, num_per_machine
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    else:
        _limit_cpu_threads(num_per_machine)
    try:
        dist.init_process_group(backend=_backend(), init_method=dist_url, world_size=world_size,
                                rank=global_rank, timeout=timeout)
    except Exception:
        logger.error("Process group initialisation at %s failed (rank %d)", dist_url, global_rank)
        raise
    try:
        _run_in_group(main_func, args)
    except MdkdError as e:  # bad input: one line, not a worker traceback through mp.spawn
        print(f"error: {user_message(e)}", file=sys.stderr, flush=True)
        sys.exit(_BAD_INPUT_STATUS)


def _run_in_group(main_func, args: Sequence[Any]) -> None:
    """Barrier, run ``main_func(*args)``, always tear the process group down."""
    try:
        comm.synchronize()
        main_func(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_from_env(main_func, args: Sequence[Any], timeout: datetime.timedelta) -> None:
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    comm._LOCAL_RANK = local_rank
    comm._LOCAL_SIZE = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if world_size == 1 or dist.is_initialized():
        main_func(*args)
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=_backend(), init_method="env://", timeout=timeout)
    _run_in_group(main_func, args)


def create_ddp_model(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """Wrap ``model`` in ``torch.nn.parallel.DistributedDataParallel`` when the world size is
    > 1; otherwise return it unchanged.

    On CUDA ``device_ids=[local rank]``. Defaults ``broadcast_buffers=False`` (as detectron2;
    BatchNorm statistics stay per process); ``kwargs`` override (e.g.
    ``find_unused_parameters=True`` for models with branches unused in some steps).
    """
    if comm.get_world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    opts = {"broadcast_buffers": False}
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        opts["device_ids"] = [comm.get_local_rank()]
    opts.update(kwargs)
    return DistributedDataParallel(model, **opts)
