"""The demo's training time under OpenMP thread policies, on a quiet and on a busy machine.

    python scripts/bench_threads.py --output bench_out/threads.json      # (make bench-threads)

Each run trains the demo config (``--IAIS singular``) for ``--steps`` steps, start-up,
validation and test included, as a user's ``make demo`` would, with one thread policy (a
set of environment variables) beside 0, 1 or 2 competing processes that keep a core busy.
Runs alternate policy by policy (A B A B) so that drift of the machine falls on all of
them alike. The table printed at the end has one row per policy, one column per load:
the mean wall time and, in brackets, its ratio to the same policy on the quiet machine.
"""
import sys  # the repository this file is in comes first, whatever the path names (another clone, none)
from os.path import dirname, realpath
sys.path.insert(0, dirname(dirname(realpath(__file__))))
import utils.threads  # noqa: E402,F401  (next: sets the OpenMP thread count before torch loads OpenMP)
import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from os.path import abspath, dirname, exists, join

from scripts.repo import ROOT, child_env
from utils.outputs import write_json
from utils.threads import available_cores, default_threads

# name -> environment; every policy names the variables it relies on, so that none of them
# comes from the caller's environment or from the project's default (utils/threads.py)
CORES = available_cores()
POLICIES = {
    "all cores, spin (libgomp's default)": {"OMP_NUM_THREADS": str(CORES), "GOMP_SPINCOUNT": "300000"},
    "all cores, passive wait": {"OMP_NUM_THREADS": str(CORES), "OMP_WAIT_POLICY": "PASSIVE"},
    "all cores, spin 10000": {"OMP_NUM_THREADS": str(CORES), "GOMP_SPINCOUNT": "10000"},
    "one core left free (default)": {"OMP_NUM_THREADS": str(default_threads(CORES)), "GOMP_SPINCOUNT": "300000"},
}
POLICY_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
BUSY = "while True: pass"


def demo_config(work):
    """The demo's training config, its data built once under ``work``/demo."""
    config = join(work, "demo", "train-itm-demo.json")
    if not exists(config):
        subprocess.run([sys.executable, join(ROOT, "scripts", "make_demo_data.py"), "--output", join(work, "demo")],
                       check=True, env=child_env(), capture_output=True)
    return config


def timed_run(config, out_dir, steps, policy, timeout):
    """Wall seconds of one training run under ``policy`` (None when it ran past ``timeout``)."""
    env = {k: v for k, v in child_env().items() if k not in POLICY_VARIABLES}
    env.update(policy)
    cmd = [sys.executable, join(ROOT, "train_itm_hard_negatives.py"), "--config", config, "--output_dir", out_dir,
           "--IAIS", "singular", "--num_train_steps", str(steps), "--valid_steps", str(steps)]
    st = time.perf_counter()
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if res.returncode != 0:
        raise SystemExit(f"bench_threads.py: error: the demo training failed: {res.stderr.strip()[-500:]}")
    return time.perf_counter() - st


def measure(config, work, policies, loads, repeats, steps, timeout):
    """{policy: {load: [seconds or None, ...]}}, loads outermost, policies alternating."""
    times = {name: {load: [] for load in loads} for name in policies}
    for load in loads:
        busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load)]
        try:
            for rep in range(repeats):
                for name in policies:
                    out_dir = join(work, "runs", f"{len(os.listdir(join(work, 'runs')))}")
                    seconds = timed_run(config, out_dir, steps, POLICIES[name], timeout)
                    times[name][load].append(seconds)
                    print(f"load {load}, {name}, run {rep + 1}: "
                          f"{'timeout' if seconds is None else f'{seconds:.1f} s'}", flush=True)
        finally:
            for p in busy:
                p.kill()
                p.wait()
    return times


def table(times, loads, timeout):
    """Markdown: mean wall seconds per policy and load, with the ratio to its quiet time."""
    head = "| policy | " + " | ".join("quiet" if load == 0 else f"{load} busy" for load in loads) + " |"
    lines = [head, "|" + " --- |" * (len(loads) + 1)]
    for name, by_load in times.items():
        quiet = by_load.get(0)
        quiet_mean = statistics.mean(quiet) if quiet and None not in quiet else None
        cells = []
        for load in loads:
            runs = by_load[load]
            if None in runs:
                cells.append(f"> {timeout:.0f} s")
                continue
            mean = statistics.mean(runs)
            ratio = f" ({mean / quiet_mean:.1f}x)" if quiet_mean and load else ""
            cells.append(f"{mean:.0f} s{ratio}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", default="bench_out/threads.json", help="JSON results")
    p.add_argument("--work", default=None, help="demo data and runs (default: a temp dir)")
    p.add_argument("--steps", type=int, default=300, help="training steps of each run")
    p.add_argument("--repeats", type=int, default=2, help="runs of each policy at each load")
    p.add_argument("--loads", type=int, nargs="+", default=[0, 1, 2], help="competing busy processes")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES), metavar="POLICY",
                   help=f"policies to measure (default all: {', '.join(POLICIES)})")
    p.add_argument("--timeout", type=float, default=400.0, help="seconds after which a run counts as collapsed")
    opts = p.parse_args()
    # a stopped measurement still ends its busy processes (the finally of measure)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = abspath(opts.work or tempfile.mkdtemp(prefix="iais_threads_"))
    os.makedirs(join(work, "runs"), exist_ok=True)
    config = demo_config(work)
    times = measure(config, work, opts.policies, opts.loads, opts.repeats, opts.steps, opts.timeout)
    result = {"cores": CORES, "steps": opts.steps, "policies": {n: POLICIES[n] for n in opts.policies},
              "seconds": {n: {str(k): v for k, v in t.items()} for n, t in times.items()},
              "table": table(times, opts.loads, opts.timeout)}
    os.makedirs(dirname(abspath(opts.output)), exist_ok=True)
    write_json(opts.output, result, indent=2)
    print(result["table"])


if __name__ == "__main__":
    main()
