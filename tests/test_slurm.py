"""Start-up from SLURM's environment (srun): two local tasks given SLURM's variables by hand
train as torchrun's two processes do."""
import os
import socket
import subprocess

import pytest
import torch

from conftest import FIXTURES
from helpers import PY, ROOT, run, tiny_train_config
from utils.distributed import first_slurm_host

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "TORCHELASTIC_RUN_ID", "HOROVOD_RANK", "OMPI_COMM_WORLD_RANK")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("nodelist, first", [
    ("node7", "node7"), ("gpu[03-04,07]", "gpu03"), ("gpu[03-04,07],cpu1", "gpu03"),
    ("a100-[12,14]-ib,b1", "a100-12-ib"), ("n1,n[2-3]", "n1"), ("rack[2-3]n[05-08]", "rack2n05"),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def slurm_tasks(args, ntasks, port):
    """Start ``ntasks`` processes as srun would on one node; returns their results in task order."""
    base = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    tasks = []
    for task in range(ntasks):  # one thread each, as torchrun gives its workers: the same sums, the same bits
        env = {**base, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task), "SLURM_NTASKS": str(ntasks),
               "SLURM_STEP_ID": "0",
               "SLURM_TASKS_PER_NODE": f"{ntasks}(x1)", "SLURM_JOB_NODELIST": "localhost",
               "SLURM_JOB_ID": "4242", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        tasks.append(subprocess.Popen([PY] + args, cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return [(task.wait(timeout=300), task.stdout.read()) for task in tasks]


def test_slurm_tasks_train_as_torchrun_does(tmp_path):
    cfg = tiny_train_config(tmp_path / "c.json", num_train_steps=2, valid_steps=2, dropout=0.1)
    outs = {name: tmp_path / name for name in ("slurm", "torchrun")}
    results = slurm_tasks(["train_itm_hard_negatives.py", "--config", cfg, "--output_dir", str(outs["slurm"]),
                           "--IAIS", "singular"], 2, free_port())
    for code, output in results:
        assert code == 0, output[-3000:]
    res = run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "train_itm_hard_negatives.py", "--config", cfg, "--output_dir", str(outs["torchrun"]),
               "--IAIS", "singular"])
    assert res.returncode == 0, (res.stderr + res.stdout)[-3000:]
    assert "2 process(es) via torch" in results[0][1]
    assert "step 2: parameters identical on 2 rank(s)" in (outs["slurm"] / "log" / "log.txt").read_text()
    slurm, torchrun = (torch.load(out / "ckpt" / "model_step_2.pt", weights_only=True) for out in outs.values())
    assert slurm.keys() == torchrun.keys()
    assert all(torch.equal(slurm[key], torchrun[key]) for key in slurm)
    initial = torch.load(os.path.join(FIXTURES, "ref_model.pt"), weights_only=True)
    assert not torch.equal(initial["uniter.pooler.dense.weight"], slurm["uniter.pooler.dense.weight"])


@pytest.mark.parametrize("step", [
    {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "16"},  # srun -n 1 in a larger allocation
    {"SLURM_NTASKS": "16"},  # python started by the batch script itself, without srun
    {"SLURM_STEP_ID": str(0xFFFFFFFB), "SLURM_NTASKS": "16"},  # the batch step, where Slurm names it
], ids=["srun-n1", "batch-shell", "batch-step"])
def test_a_process_not_started_as_one_of_several_srun_tasks_runs_alone(tmp_path, step):
    cfg = tiny_train_config(tmp_path / "c.json", num_train_steps=1, valid_steps=1)
    res = run(["train_itm_hard_negatives.py", "--config", cfg, "--output_dir", str(tmp_path / "out")],
              env={"SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "nowhere[1-2]", **step}, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 process(es) via single process" in res.stderr + res.stdout


def test_sbatch_example_is_two_nodes_of_eight_tasks():
    path = os.path.join(ROOT, "scripts", "slurm_train.sbatch")
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    with open(path) as f:
        text = f.read()
    directives = dict(line[len("#SBATCH --"):].split("=", 1) for line in text.splitlines()
                      if line.startswith("#SBATCH --"))
    assert directives["nodes"] == "2" and directives["ntasks-per-node"] == "8" and directives["gpus-per-node"] == "8"
    assert 'srun --kill-on-bad-exit=1 "$PYTHON" train_itm_hard_negatives.py --config "$CONFIG"' in text
