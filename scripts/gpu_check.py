"""The GPU check: runs the CUDA path end to end and measures what a GPU user needs, in one
command of a few minutes. Everything goes to OUT/gpu_check.json and OUT/gpu_check.log.

    make gpu-check [GPU_CHECK_OUT=gpu_check_out] [WHEELS=wheels]
    python scripts/gpu_check.py --output gpu_check_out [--wheels wheels]

1. the CUDA tests (pytest -m cuda);
2. UNITER-base: no-grad scoring of 400 pairs and an IAIS hard-negative training step under
   bf16 and fp16 autocast, model FLOP utilisation against the card's dense peak (from its
   name), and the bf16 training step fed by the real text-side loader stream;
3. full evaluation as inf_itm.py runs it, projected to Flickr30k 1K and MS COCO 5K;
4. the demo config trained on the device with --fp16, then evaluated with inf_itm.py.
Without a GPU it takes the CPU branch: the same steps with the demo-size model, fewer
steps and no CUDA tests to run (that is how its code path is tested).
"""
import sys  # the repository this file is in comes first, whatever the path names (another clone, none)
from os.path import dirname, realpath
sys.path.insert(0, dirname(dirname(realpath(__file__))))
import utils.threads  # noqa: E402,F401  (next: sets the OpenMP thread count before torch loads OpenMP)
import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from os.path import join

from scripts.repo import ROOT, child_env
from utils.outputs import write_json

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would fill the log; read when tqdm is imported
# what the check imports, by module and pip name: a CUDA PyTorch image often lacks the first three
NEEDED = {"lmdb": "lmdb", "lz4": "lz4", "msgpack": "msgpack", "numpy": "numpy", "tqdm": "tqdm",
          "tensorboard": "tensorboard", "pytest": "pytest"}


def missing_packages():
    return [pip for module, pip in NEEDED.items() if importlib.util.find_spec(module) is None]


def ensure_packages(wheels):
    """Installs missing packages from a folder of wheels (no index: the machine may be offline)."""
    missing = missing_packages()
    if missing and wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--find-links", wheels] + missing, check=False)
        importlib.invalidate_caches()
        missing = missing_packages()
    if missing:
        raise SystemExit(f"gpu_check.py: error: Python packages missing: {' '.join(missing)}; pip install them, "
                         "or on an offline machine bring wheels (`make wheels` where pip works) and pass --wheels DIR")


class Log:
    """Prints a line and keeps it in OUT/gpu_check.log; subprocess output goes to the log only."""

    def __init__(self, path):
        self.file = open(path, "a")

    def __call__(self, msg):
        print(msg, flush=True)
        self.file.write(msg + "\n")
        self.file.flush()

    def command(self, args, timeout, env=None):
        """Runs ``args`` in the repository, its output appended to the log: (exit status, output)."""
        self.file.write(f"$ {' '.join(args)}\n")
        self.file.flush()
        try:
            res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                                 env=child_env(PYTHONUNBUFFERED="1", **(env or {})))
            rc, output = res.returncode, res.stdout + res.stderr
        except subprocess.TimeoutExpired as e:
            partial = [s.decode(errors="replace") if isinstance(s, bytes) else s for s in (e.stdout, e.stderr) if s]
            rc, output = 124, "".join(partial) + f"\ntimed out after {timeout} s"
        self.file.write(output + f"\n(exit status {rc})\n")
        self.file.flush()
        return rc, output


def run_cuda_tests(log, timeout):
    st = time.time()
    rc, output = log.command([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                              "tests"], timeout)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", output)}
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    return {"exit_status": rc, **counts, "failed_tests": failed, "seconds": time.time() - st}


def run_demo(log, work, steps, timeout, images=(1000, 100, 100)):
    """make_demo_data.py with ``images`` (train, val, test), then the demo config trained with
    --fp16 for ``steps`` steps, then inf_itm.py on the test split: seconds and R@K."""
    demo = join(work, "demo")
    out = {"train_steps": steps, "images": images}
    sizes = [str(v) for pair in zip(("--n_train", "--n_val", "--n_test"), images) for v in pair]
    rc, _ = log.command([sys.executable, "scripts/make_demo_data.py", "--output", demo, *sizes], timeout)
    if rc:
        return {**out, "error": "make_demo_data.py failed (see the log)"}
    from scripts.demo_config import write_train_config
    cfg = join(work, "train-itm-demo.json")
    config = write_train_config(demo, cfg, num_train_steps=steps, valid_steps=steps, warmup_steps=max(1, steps // 10),
                                n_workers=2, pin_mem=True, inf_minibatch_size=min(100, *images[1:]))
    st = time.time()
    rc, output = log.command([sys.executable, "train_itm_hard_negatives.py", "--config", cfg, "--output_dir",
                              join(work, "output"), "--IAIS", "singular", "--fp16"], timeout)
    out["train_s"] = time.time() - st
    out["precision"] = next(iter(re.findall(r"mixed precision: ([^\n]*)", output)), "")
    if rc:
        return {**out, "error": f"training failed with exit status {rc} (see the log)"}
    st = time.time()
    rc, output = log.command([sys.executable, "inf_itm.py", "--txt_db", config["test_txt_db"], "--img_db",
                              config["test_img_db"], "--checkpoint", join(work, "output", "ckpt",
                                                                          f"model_step_{steps}.pt"),
                              "--model_config", config["model_config"], "--output_dir", join(work, "eval"),
                              "--batch_size", str(config["inf_minibatch_size"]), "--fp16", "--pin_mem"], timeout)
    out["eval_s"] = time.time() - st
    if rc:
        return {**out, "error": f"inf_itm.py failed with exit status {rc} (see the log)"}
    with open(join(work, "eval", "scores.json")) as f:
        out["test_recall"] = json.load(f)
    return out


def targets(results):
    """The GPU targets (performance notes), met or not; None where not measured."""
    bench, evaluation = results.get("bench", {}), results.get("evaluation", {})
    mfu = bench.get("device_score_bf16_fused_mfu")
    waiting = bench.get("device_fed_train_waiting_for_loader")
    coco = min((v for k, v in evaluation.items() if k.startswith("eval_projected_coco_5k")), default=None)
    return {"score_bf16_mfu_at_least_0.5": None if mfu is None else mfu >= 0.5,
            "fed_training_waits_under_5_percent": None if waiting is None else waiting < 0.05,
            "coco_5k_evaluation_under_30_minutes": None if coco is None else coco < 30}


def device_benchmarks(log, work, cuda, min_time, peak):
    import torch
    from scripts.bench_common import make_bench_db
    from scripts.bench_device import bench_device, bench_evaluation, training_stream
    from scripts.utilisation import bench_utilisation
    from model import UniterConfig
    device = torch.device("cuda" if cuda else "cpu")
    # the CPU branch runs the same code with the demo-size model and few pairs
    config_name, sizes = ("uniter-base.json", {}) if cuda else ("uniter-demo.json", {"n": 16, "hard": 3})
    config = UniterConfig.from_json_file(join(ROOT, "config", config_name))
    config.vocab_size = 28996  # the bench DB's captions use the whole cased BERT vocabulary
    root = join(work, "bench_db")
    st = time.time()
    make_bench_db(root, 600 if cuda else 24)
    log(f"bench DB built in {time.time() - st:.0f} s")
    negatives = 399 if cuda else 7
    out = bench_device(device, config, min_time, peak_tflops=peak,
                       stream=training_stream(root, device, negatives), **sizes)
    out.update(bench_utilisation(device, config, min_time, **(sizes or {"n": 400, "hard": 31})))
    log("device benchmark: " + json.dumps({k: v for k, v in out.items() if "per_s" in k or "mfu" in k or
                                           "waiting" in k or k.startswith("util_")}, default=str))
    evaluation = bench_evaluation(root, device, config, min_time, peak_tflops=peak,
                                  **({} if cuda else {"n_texts": 4, "mini_batch": 10, "buckets": (0, 4)}))
    log("evaluation: " + json.dumps(evaluation))
    return out, evaluation


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", default="gpu_check_out", help="folder for gpu_check.json and gpu_check.log")
    p.add_argument("--wheels", default=None, help="folder of wheels to install missing packages from (offline)")
    p.add_argument("--min_time", type=float, default=None, help="seconds per measurement (default: 2 on a GPU)")
    p.add_argument("--demo_steps", type=int, default=None, help="demo training steps (default: 300 on a GPU)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the card's dense bf16 peak in TFLOP/s (default: from its name)")
    p.add_argument("--skip_tests", action="store_true", help="do not run the CUDA tests")
    opts = p.parse_args()
    ensure_packages(opts.wheels)
    import torch
    from scripts.bench_device import peak_tflops_of

    os.makedirs(opts.output, exist_ok=True)
    log = Log(join(opts.output, "gpu_check.log"))
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    peak = opts.peak_tflops or (peak_tflops_of(name) if cuda else None)
    min_time = opts.min_time if opts.min_time is not None else (2.0 if cuda else 0.0)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
               "python": platform.python_version(), "peak_tflops": peak, "branch": "cuda" if cuda else "cpu"}
    log(f"GPU check on {name}, torch {torch.__version__} (CUDA {torch.version.cuda}), peak {peak} TFLOP/s")
    st = time.time()
    work = tempfile.mkdtemp(prefix="iais_gpu_check_")
    if not opts.skip_tests:
        results["cuda_tests"] = run_cuda_tests(log, timeout=240)
        log("CUDA tests: " + json.dumps(results["cuda_tests"]))
    results["bench"], results["evaluation"] = device_benchmarks(log, work, cuda, min_time, peak)
    steps = opts.demo_steps or (300 if cuda else 10)
    # the CPU branch trains on a small demo world (the full one's evaluations take minutes there)
    results["demo"] = run_demo(log, work, steps, timeout=240, **({} if cuda else {"images": (40, 10, 10)}))
    log("demo: " + json.dumps(results["demo"]))
    results["targets"] = targets(results)
    results["total_s"] = time.time() - st
    write_json(join(opts.output, "gpu_check.json"), results, indent=2)
    log("targets: " + json.dumps(results["targets"]))
    log(f"GPU check finished in {results['total_s']:.0f} s: {join(opts.output, 'gpu_check.json')}")
    failed = results.get("cuda_tests", {}).get("exit_status", 0) not in (0, 5) or "error" in results["demo"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
