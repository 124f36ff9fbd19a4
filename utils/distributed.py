"""One interface over horovod (horovodrun), torch.distributed (torchrun or SLURM's srun) and
a single process. The rest of the code calls these functions and never asks which one runs."""
import datetime
import os
import pickle
import re

import torch

from .environment import EnvironmentVariableError, env_int, env_value

_backend = None  # None (single process), "horovod" or "torch"
_hvd = None


def launched_by_horovod():
    return "HOROVOD_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ


def launched_by_torchrun():
    return "TORCHELASTIC_RUN_ID" in os.environ or bool(env_value("RANK") and env_value("WORLD_SIZE"))


_LAUNCH_ADVICE = "launch with torchrun (which sets it), or unset it to run one process"
_PORT_ADVICE = "give a free TCP port, or unset it (torchrun and srun choose one)"
# the integers a launcher sets and torch.distributed or the LMDB readers parse: (lowest, highest)
LAUNCH_INTEGERS = {"RANK": (0, None), "WORLD_SIZE": (1, None), "LOCAL_RANK": (0, None),
                   "LOCAL_WORLD_SIZE": (1, None), "MASTER_PORT": (1, 65535), "HOROVOD_LOCAL_SIZE": (1, None),
                   "OMPI_COMM_WORLD_LOCAL_SIZE": (1, None)}


def check_launch_environment():
    """Refuse launch variables that torch.distributed (or the LMDB readers) would fail on
    with a traceback, or that would make a run of several processes silently one: integers
    out of range, RANK without WORLD_SIZE, a group without MASTER_ADDR or MASTER_PORT."""
    values = {name: env_int(name, None, low, high, _PORT_ADVICE if name == "MASTER_PORT" else _LAUNCH_ADVICE)
              for name, (low, high) in LAUNCH_INTEGERS.items()}
    if launched_by_horovod() or launched_by_slurm():  # they bring their own rendezvous (srun's: adopted in init)
        return
    rank, world = values["RANK"], values["WORLD_SIZE"]
    if (rank is None) != (world is None):
        given, lacking = ("RANK", "WORLD_SIZE") if world is None else ("WORLD_SIZE", "RANK")
        raise EnvironmentVariableError(f"environment variable {given}={values[given]} is set but {lacking} is "
                                       f"not: launch with torchrun (or srun), which sets both, or unset {given} "
                                       f"to run one process")
    if rank is not None and rank >= world:
        raise EnvironmentVariableError(f"environment variable RANK={rank} must be below WORLD_SIZE={world}; "
                                       f"launch with torchrun, or unset RANK and WORLD_SIZE to run one process")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if rank is not None and env_value(name) is None:
            raise EnvironmentVariableError(
                f"environment variables RANK={rank} and WORLD_SIZE={world} are set but {name} is not: launch "
                f"with torchrun, or set MASTER_ADDR and MASTER_PORT to rank 0's host and a free port, or unset "
                f"RANK and WORLD_SIZE to run one process")
    local_rank, local_size = values["LOCAL_RANK"], values["LOCAL_WORLD_SIZE"]
    if local_rank is not None and local_size is not None and local_rank >= local_size:
        raise EnvironmentVariableError(f"environment variable LOCAL_RANK={local_rank} must be below "
                                       f"LOCAL_WORLD_SIZE={local_size}; {_LAUNCH_ADVICE}")


_SLURM_RESERVED_STEPS = 0xFFFFFFF0  # ids of the batch script's, salloc's and the extern step


def slurm_step_tasks():
    return int(os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or 1)


def launched_by_slurm():
    """srun started this process as one of several tasks of a job step. A batch script's own
    shell also sees SLURM_PROCID and the allocation's SLURM_NTASKS, but no step id of srun's."""
    step = os.environ.get("SLURM_STEP_ID", "")
    return ("SLURM_PROCID" in os.environ and step.isdigit() and int(step) < _SLURM_RESERVED_STEPS
            and slurm_step_tasks() > 1)


def first_slurm_host(nodelist):
    """First host of a Slurm host list: ``gpu[03-04,07],cpu1`` -> ``gpu03``."""
    first = re.split(r",(?![^\[]*\])", nodelist)[0]
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", first)


def adopt_slurm_environment():
    """Translate srun's task layout into the variables torch.distributed starts from; what the
    user set (MASTER_ADDR, MASTER_PORT) wins. Every task of a job derives the same port."""
    env = os.environ
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], str(slurm_step_tasks())
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    tasks_here = re.match(r"\d+", env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""))
    if tasks_here:  # "8(x2)": the LMDB readers switch read-ahead off when a node runs several tasks
        env.setdefault("LOCAL_WORLD_SIZE", tasks_here.group())
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    env.setdefault("MASTER_ADDR", first_slurm_host(nodelist))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "9500")) % 20000))


def init(timeout_s=600):
    """Join the process group the launcher set up (if any); returns the torch device.

    Collectives time out after ``timeout_s`` so that a dead rank stops the others."""
    global _backend, _hvd
    use_cuda = torch.cuda.is_available()
    if launched_by_horovod():
        os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", str(timeout_s))
        import horovod.torch as hvd
        hvd.init()
        _backend, _hvd = "horovod", hvd
    elif launched_by_slurm() and not launched_by_torchrun():
        adopt_slurm_environment()
    check_launch_environment()
    # a group even for one process, so that `torchrun --nproc_per_node 1` runs the
    # collectives of an 8-GPU run (NCCL on a GPU)
    if _backend is None and launched_by_torchrun():
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(get_local_rank())
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        _backend = "torch"
    if use_cuda:
        torch.cuda.set_device(get_local_rank())
        return torch.device("cuda", get_local_rank())
    return torch.device("cpu")


def backend_name():
    if _backend == "torch":
        return f"torch ({torch.distributed.get_backend()})"
    return _backend or "single process"


def get_rank():
    if _backend == "horovod":
        return _hvd.rank()
    if _backend == "torch":
        return torch.distributed.get_rank()
    return 0


def get_world_size():
    if _backend == "horovod":
        return _hvd.size()
    if _backend == "torch":
        return torch.distributed.get_world_size()
    return 1


def get_local_rank():
    if _backend == "horovod":
        return _hvd.local_rank()
    return env_int("LOCAL_RANK", 0, advice=_LAUNCH_ADVICE)


def is_main_process():
    return get_rank() == 0


def broadcast_parameters(module, root=0):
    """Give every rank rank ``root``'s parameters and buffers."""
    if _backend == "horovod":
        _hvd.broadcast_parameters(module.state_dict(), root_rank=root)
    elif _backend == "torch":
        for tensor in module.state_dict().values():
            torch.distributed.broadcast(tensor, src=root)


def all_reduce_mean(tensors, name="grads"):
    """Average tensors (gradients) over ranks, in place, as one flat buffer (``name``: horovod's
    name of the collective)."""
    if _backend is None or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if _backend == "horovod":
        flat = _hvd.allreduce(flat, op=_hvd.Average, name=name)
    else:
        torch.distributed.all_reduce(flat)
        flat /= get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_gather_object(obj):
    """List of every rank's ``obj`` (picklable), in rank order."""
    if _backend is None:
        return [obj]
    if _backend == "torch":
        out = [None] * get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    gathered = _hvd.allgather(payload)
    sizes = _hvd.allgather(torch.tensor([payload.numel()]))
    out, offset = [], 0
    for n in sizes.tolist():
        out.append(pickle.loads(gathered[offset:offset + n].numpy().tobytes()))
        offset += n
    return out


def all_gather_rows(tensor):
    """Concatenate every rank's tensor along dim 0 (row counts may differ), in rank order."""
    if _backend is None:
        return tensor
    if _backend == "horovod":
        return _hvd.allgather(tensor)
    sizes = all_gather_object(tensor.size(0))
    padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
    padded[:tensor.size(0)] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def barrier():
    if _backend == "horovod":
        _hvd.join()
    elif _backend == "torch":
        torch.distributed.barrier()


def abandon():
    """Leave the process group without waiting for the other ranks (a run stopping on an
    error): its threads are stopped here, not torn down at interpreter exit, which can abort."""
    global _backend
    if _backend == "torch":
        torch.distributed.destroy_process_group()
    _backend = None


def shutdown():
    global _backend
    if _backend == "torch":
        # every rank leaves together: a rank tearing down its gloo pairs while a peer is still
        # in a collective can abort that peer at exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    elif _backend == "horovod":
        _hvd.shutdown()
    _backend = None
