"""train/hardware/gpus.py, train/run/distributed.py and the SLURM task environment: which GPU each rank takes, the stop-on-signal flag,
per-rank random streams.

No GPU exists here: the CUDA device COUNT is a parameter of cuda_device_plan (a mocked number of visible GPUs,
nothing else is mocked); the environment is the one SLURM + submitit really produce, computed in a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import TINY, make_shards

from train.hardware.gpus import DeviceError, cuda_device_plan
from train.run.distributed import CpuSyncBatchNorm, StopFlag, convert_sync_batchnorm

ROOT = Path(__file__).resolve().parents[1]


def slurm_task_env(local_id: int, *, tasks_per_node: int = 4, visible: str = "0,1,2,3") -> dict:
    """What SLURM sets for task `local_id` of a one-node job with `tasks_per_node` tasks and 4 GPUs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_VISIBLE"))}
    env.update(
        SUBMITIT_EXECUTOR="slurm",  # set by the sbatch script submitit writes
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="gpunode1",
        SLURM_NODELIST="gpunode1",
        SLURM_JOB_NUM_NODES="1",
        SLURM_NNODES="1",
        SLURM_NODEID="0",
        SLURM_PROCID=str(local_id),
        SLURM_LOCALID=str(local_id),
        SLURM_NTASKS=str(tasks_per_node),
        SLURM_NTASKS_PER_NODE=str(tasks_per_node),
        SLURM_STEP_NUM_TASKS=str(tasks_per_node),
        SLURM_TASKS_PER_NODE=str(tasks_per_node),
        CUDA_VISIBLE_DEVICES=visible,
    )
    return env


def exported_env(local_id: int, **kw) -> dict:
    """The environment a catdog SLURM task has after launch.slurm_job.export_distributed_env (run for real)."""
    code = (
        "import json, os; from launch.slurm_job import export_distributed_env; export_distributed_env('4242'); "
        "print(json.dumps({k: os.environ.get(k) for k in "
        "('RANK','LOCAL_RANK','WORLD_SIZE','LOCAL_WORLD_SIZE','MASTER_ADDR','MASTER_PORT','CUDA_VISIBLE_DEVICES')}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=slurm_task_env(local_id, **kw), cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("local_id", [0, 1, 3])
def test_slurm_task_keeps_the_nodes_gpus_and_trains_on_its_local_rank(local_id):
    env = exported_env(local_id)
    assert env["LOCAL_RANK"] == str(local_id) and env["RANK"] == str(local_id)
    assert env["WORLD_SIZE"] == "4" and env["LOCAL_WORLD_SIZE"] == "4" and env["MASTER_ADDR"] == "gpunode1"
    # submitit's default would set CUDA_VISIBLE_DEVICES=<local rank>: one visible GPU, cuda:0, while Accelerate
    # hands DDP device_ids=[local rank] -> rank 1 asks for device 1 of 1. We keep what SLURM gave the job.
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    plan = cuda_device_plan(env, visible=len(env["CUDA_VISIBLE_DEVICES"].split(",")))  # mocked GPU count
    # The device Accelerate trains on (local_rank % visible) is the one DDP is given ([local_rank]).
    assert plan.device_index == local_id % plan.visible == local_id and not plan.ddp_device_from_module


def test_one_gpu_per_task_uses_cuda0_and_lets_ddp_take_the_modules_device():
    # Sites that bind one GPU to each task (--gpus-per-task=1, gpu-bind): every rank sees exactly one device.
    env = exported_env(2, visible="2")
    plan = cuda_device_plan(env, visible=1)  # mocked GPU count
    assert plan.device_index == 0 and plan.ddp_device_from_module
    assert "one GPU per task" in plan.describe()


def test_more_ranks_than_visible_gpus_is_a_clear_error():
    with pytest.raises(DeviceError, match=r"local rank 3 of 4 sees only 2 GPU\(s\).*one rank per GPU"):
        cuda_device_plan({"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4", "CUDA_VISIBLE_DEVICES": "0,1"}, visible=2)
    plan = cuda_device_plan({}, visible=8)  # a plain single process: cuda:0
    assert plan.device_index == 0 and plan.local_world_size == 1


def test_accelerates_device_is_checked_against_the_plan():
    from train.run.setup import check_device

    plan = cuda_device_plan({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, visible=2)  # mocked GPU count
    check_device(torch.device("cuda", 1), plan, current=1)
    with pytest.raises(RuntimeError, match="Accelerate picked cuda:0, the device plan says local rank 1/2 -> cuda:1"):
        check_device(torch.device("cuda", 0), plan, current=0)
    # One process: Accelerate's device is the index-less "cuda", i.e. the current device (cuda:0).
    check_device(torch.device("cuda"), cuda_device_plan({}, visible=1), current=0)


def test_stop_flag_is_set_by_the_signal_and_chains_to_the_previous_handler():
    seen = []
    old = signal.signal(signal.SIGUSR2, lambda s, f: seen.append(s))
    try:
        flag = StopFlag()
        previous = flag.install(signal.SIGUSR2)[signal.SIGUSR2]
        flag.start_polling()  # the training loop
        assert not flag.agreed(0)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flag.requested and flag.signum == signal.SIGUSR2 and flag.agreed(1)
        assert seen == []  # the previous handler (submitit's) is not run by the signal itself ...
        flag.hand_over()  # ... the launcher hands over once the checkpoint is saved
        assert seen == [signal.SIGUSR2] and previous is not None
        flag.hand_over()
        assert seen == [signal.SIGUSR2]  # once
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_a_signal_outside_the_training_loop_goes_to_the_previous_handler_at_once():
    """Start-up, feature extraction and the final scoring do not poll the flag: there submitit's handler must
    requeue at once, or SLURM kills the job at its time limit with no requeue. A signal that came after the
    loop's last poll is handed over when the loop ends."""
    seen = []

    def submitits(signum, frame):
        seen.append(signum)

    old = signal.signal(signal.SIGUSR2, submitits)
    try:
        flag = StopFlag()
        flag.install(signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)  # before the loop
        assert seen == [signal.SIGUSR2] and flag.requested

        signal.signal(signal.SIGUSR2, submitits)
        late = StopFlag()
        late.install(signal.SIGUSR2)
        late.start_polling()
        os.kill(os.getpid(), signal.SIGUSR2)  # after the loop's last poll
        assert seen == [signal.SIGUSR2]
        late.stop_polling()  # the loop is over: hand it over now
        assert seen == [signal.SIGUSR2] * 2
        os.kill(os.getpid(), signal.SIGUSR2)  # during finish(): already handed over, not twice
        assert seen == [signal.SIGUSR2] * 2

        signal.signal(signal.SIGUSR2, submitits)
        unsignalled = StopFlag()  # rank 0 stopped by the vote (another node got the signal first) ...
        unsignalled.install(signal.SIGUSR2)
        unsignalled.start_polling()
        unsignalled.hand_over()  # ... must still requeue the job
        assert seen == [signal.SIGUSR2] * 3

        forked = StopFlag()  # a DataLoader worker forked from the rank inherits the handler; SLURM signals it too
        forked.install(signal.SIGUSR2)
        pid = os.fork()
        if pid == 0:  # the worker: nothing may happen here (no requeue from a worker)
            os.kill(os.getpid(), signal.SIGUSR2)
            os._exit(0 if seen == [signal.SIGUSR2] * 3 and not forked.requested else 1)
        assert os.waitpid(pid, 0)[1] == 0
        assert seen == [signal.SIGUSR2] * 3 and not forked.requested

        plain = StopFlag()  # no handler to chain to (SIG_DFL would kill the process): the flag only
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        plain.install(signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert plain.requested
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_barrier_runs_on_the_ranks_own_gpu(monkeypatch):
    """MOCKED GPU (none exists here): with one GPU per task every rank trains on cuda:0, and Accelerate's
    wait_for_everyone would name cuda:<local rank> for the NCCL barrier (accelerate#3775)."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from train.hardware.gpus import wait_for_everyone

    calls = []
    monkeypatch.setattr(dist, "barrier", lambda **kw: calls.append(kw))
    acc = SimpleNamespace(
        num_processes=8, device=torch.device("cuda", 0), wait_for_everyone=lambda: calls.append("acc")
    )
    wait_for_everyone(acc)
    assert calls == [{"device_ids": [0]}]
    cpu = SimpleNamespace(num_processes=2, device=torch.device("cpu"), wait_for_everyone=lambda: calls.append("acc"))
    wait_for_everyone(cpu)  # gloo ranks: Accelerate's own barrier
    assert calls[-1] == "acc"


def test_bare_module_leaves_the_compiled_training_model_alone(tmp_path):
    """accelerate's unwrap_model returned the compile wrapper (keys `_orig_mod.*`: loading the best weights for the
    test scoring failed) and re-pointed it from DDP to the bare module (DDP's no_sync gone)."""
    import torch.distributed as dist

    from train.run.setup import bare_module

    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    compiled = torch.compile(net)  # compiled lazily: nothing is compiled here
    assert bare_module(compiled) is net
    bare_module(compiled).load_state_dict(net.state_dict())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        training = torch.compile(ddp)
        assert bare_module(training) is net and training._orig_mod is ddp
    finally:
        dist.destroy_process_group()


def test_cpu_sync_batchnorm_is_plain_batchnorm_on_one_process():
    torch.manual_seed(0)
    bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    sync = convert_sync_batchnorm(torch.nn.Sequential(*[m for m in bn]), torch.device("cpu"))
    assert isinstance(sync[1], CpuSyncBatchNorm)
    x = torch.randn(6, 3, 5, 5)
    torch.testing.assert_close(sync(x), bn(x))


@pytest.mark.slow
def test_ranks_start_from_the_same_weights_but_draw_different_dropout(tmp_path, real_data, port):
    """Two real gloo ranks build the model the trainer's way: identical weights, different dropout masks."""
    shards = make_shards(real_data, tmp_path / "shards")
    code = (
        "import json, sys, torch\n"
        "from train.config_io import load_config\n"
        "from data_prep.info import load_info\n"
        "from train.run.images import build\n"
        "from train.run.setup import make_accelerator\n"
        "from pathlib import Path\n"
        "cfg = load_config(None, sys.argv[1:])\n"
        "acc = make_accelerator(cfg, Path(cfg.run.dir))\n"
        "run = build(cfg, acc, load_info(cfg.data.dir), None)\n"
        "w = acc.unwrap_model(run.model).head.weight\n"
        "mask = torch.nn.functional.dropout(torch.ones(64), 0.5)\n"
        "print('PROBE', json.dumps({'w': float(w.double().sum()), 'mask': mask.tolist()}), flush=True)\n"
    )
    args = [f"data.dir={shards}", f"run.dir={tmp_path / 'run'}", *TINY, "train.cpu=true"]
    procs = []
    for rank in range(2):
        rank_env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code, *args], cwd=ROOT, env=rank_env, stdout=subprocess.PIPE, text=True
            )
        )
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    probes = [json.loads(next(x for x in o.splitlines() if x.startswith("PROBE"))[6:]) for o in outs]
    assert probes[0]["w"] == probes[1]["w"]  # same initial weights on every rank
    assert probes[0]["mask"] != probes[1]["mask"]  # but each rank its own random stream
