"""mdkd_det.engine.launch + comm: 2 gloo CPU processes train the toy model with DDP."""

import os

import pytest
import torch
from _engine_toy import ToyModel, make_loader, solver_cfg

from mdkd_det.engine import comm
from mdkd_det.engine.launch import create_ddp_model, launch
from mdkd_det.engine.trainer import SimpleTrainer
from mdkd_det.solver import build_optimizer
from mdkd_det.utils.errors import ConfigError


def _ddp_worker(out_dir):
    torch.set_num_threads(1)
    rank = comm.get_rank()
    torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's weights
    model = ToyModel()
    ddp = create_ddp_model(model)
    opt = build_optimizer(solver_cfg(), model)
    trainer = SimpleTrainer(ddp, make_loader(rank=rank), opt, grad_clip=1.0)
    trainer.train(0, 3)
    comm.synchronize()
    gathered = comm.all_gather(rank)
    torch.save({"rank": rank, "world": comm.get_world_size(), "local_rank": comm.get_local_rank(),
                "is_ddp": type(ddp).__name__, "gathered": gathered, "state": model.state_dict(),
                "loss": trainer.storage.history("total_loss").values()},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.timeout(240)
def test_two_gloo_processes_end_with_identical_parameters(tmp_path):
    launch(_ddp_worker, num_gpus_per_machine=2, args=(str(tmp_path),))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert (r0["world"], r1["world"], r0["local_rank"], r1["local_rank"]) == (2, 2, 0, 1)
    assert r0["is_ddp"] == "DistributedDataParallel" and r0["gathered"] == [0, 1]
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    torch.manual_seed(0)
    init = ToyModel().state_dict()
    assert not torch.equal(init["fc1.weight"], r0["state"]["fc1.weight"])  # it trained
    assert r0["loss"] == r1["loss"]  # logged losses are averaged over ranks


def test_single_process_runs_inline_without_distributed():
    seen = []
    launch(lambda x: seen.append((x, comm.get_world_size(), comm.get_rank())), 1, args=(7,))
    assert seen == [(7, 1, 0)]
    model = ToyModel()
    assert create_ddp_model(model) is model


def test_auto_url_needs_one_machine():
    with pytest.raises(ConfigError, match="dist-url auto"):
        launch(print, 2, num_machines=2, machine_rank=0, dist_url="auto")
    with pytest.raises(ConfigError, match="machine-rank"):
        launch(print, 1, num_machines=2, machine_rank=2, dist_url="tcp://127.0.0.1:1")


def test_torchrun_environment_calls_main_directly(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(comm, "_LOCAL_RANK", None)
    seen = []
    launch(lambda: seen.append(comm.get_local_rank()), num_gpus_per_machine=4)
    assert seen == [0]


_TORCHRUN_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from test_launch import _ddp_worker
from mdkd_det.engine.launch import launch
launch(_ddp_worker, num_gpus_per_machine=1, args=({out!r},))
"""


@pytest.mark.timeout(120)
def test_started_by_torchrun_two_processes(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(_TORCHRUN_SCRIPT.format(tests=os.path.dirname(__file__), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert (r0["world"], r1["local_rank"], r0["is_ddp"]) == (2, 1, "DistributedDataParallel")
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])


def _sleeping_worker(out_dir):
    """Writes rank<r>.pid once the process group is up, then 'trains' for 10 minutes."""
    import time

    with open(os.path.join(out_dir, f"rank{comm.get_rank()}.pid"), "w") as f:
        f.write(str(os.getpid()))
    for _ in range(600):
        time.sleep(1)
    open(os.path.join(out_dir, f"rank{comm.get_rank()}.finished"), "w").close()


_ORPHAN_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_launch import _sleeping_worker
from mdkd_det.engine.launch import launch
if __name__ == "__main__":  # workers are spawned: they re-import this file
    launch(_sleeping_worker, num_gpus_per_machine=2, args=({out!r},))
"""


def _running(pid: int) -> bool:
    """Process ``pid`` exists and is not a zombie (an un-reaped orphan counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc")
@pytest.mark.timeout(900)
def test_workers_exit_when_the_launcher_is_killed(tmp_path):
    """kill -9 of the launcher: both gloo workers notice (parent-death signal / watchdog) and exit
    instead of running to the end (issue 13). Bounded waits are liveness limits, not timings."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "launch.py"
    script.write_text(_ORPHAN_SCRIPT.format(tests=os.path.dirname(__file__), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE)
    pids = []
    try:
        deadline = time.monotonic() + 600  # start-up (imports) on a loaded 2-core machine
        while len(pids) < 2 and time.monotonic() < deadline and launcher.poll() is None:
            pids = [int(p.read_text()) for p in sorted(tmp_path.glob("rank*.pid")) if p.read_text()]
            time.sleep(0.5)
        assert len(pids) == 2, launcher.stderr.read().decode()[-2000:] if launcher.poll() is not None else "no pids"
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 60
        while any(_running(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_running(p) for p in pids), "orphaned workers still running"
        assert not list(tmp_path.glob("rank*.finished"))
    finally:
        for p in pids:
            if _running(p):
                os.kill(p, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()


@pytest.mark.timeout(300)
def test_worker_whose_launcher_is_already_gone_exits_at_once():
    """The fallback check: a parent pid that is not ours any more -> os._exit(1) at once."""
    import subprocess
    import sys

    code = ("from mdkd_det.engine.launch import exit_with_parent\n"
            "import os, time\nexit_with_parent(os.getppid() + 1)\ntime.sleep(600)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 1, proc.stderr[-2000:]
