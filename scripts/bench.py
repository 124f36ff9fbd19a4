"""Throughput of the hot paths against the project's plain path, measured in one run.

    python scripts/bench.py --output bench_out/bench.json        # (make bench)
    python scripts/bench.py --original_repo ~/src/IAIS           # (make bench ORIGINAL=~/src/IAIS)

CPU workloads (README: one run of each, this code, the plain path and the original):
  text_side   ItmRankDatasetHardNegFromText, negative_size 399: micro-batches/s
  image_side  ItmRankDatasetHardNegFromImage, negative_size 399: micro-batches/s
  eval_items  ItmEvalDataset, a caption against every image in mini-batches of 400: items/s
  streams     text-side batches as the training loop receives them from 4 loader
              threads or processes, also feeding a loop that behaves like GPU training
  eval        no-grad scoring, 4 layers / 256 hidden / 4 heads, 1 text x 64 images: pairs/s
  train       hard-negative step (63 negatives -> 7 hard, forward + backward), with and
              without IAIS: steps/s
  util        UNITER-base at the release's lengths, no-grad scoring and an IAIS training
              step: model FLOP/s as a share of this host's fp32 matmul rate, measured here
The plain path is what the original does: decode every array (soft_labels included),
convert to float32, pad box by box, eager attention, four IAIS attention passes. Values
of both paths are compared. With --gpu, UNITER-base scoring and a training step with IAIS
are measured on the GPU too (bf16 and fp16 autocast), with model FLOP utilisation, the
training step fed by a real text-side stream (how long it waits for batches) and full
evaluation projected to the release's test sets (scripts/bench_device.py). With
--original_repo (a checkout of lancopku/IAIS), the original code itself runs the same
CPU workloads on the same DBs and weights (scripts/bench_original.py): its rates, the
ratios to them and the differences of its scores and losses from this code's are added.
"""
import sys  # the repository this file is in comes first, whatever the path names (another clone, none)
from os.path import dirname, realpath
sys.path.insert(0, dirname(dirname(realpath(__file__))))
import utils.threads  # noqa: E402,F401  (next: sets the OpenMP thread count before torch loads OpenMP)
import argparse
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from os.path import abspath, dirname, join

import msgpack
import numpy as np
import torch

from data import (WORKER_TYPES, ItmEvalDataset, ItmRankDatasetHardNegFromImage, ItmRankDatasetHardNegFromText,
                  ResumableStream, itm_rank_hn_collate, pad_tensors)
from data.batch import box_position_features
from model import UniterConfig, UniterForImageTextRetrievalHardNeg
from scripts.bench_common import BENCH_OBJECTIVES, fast_paths, fed_loop, make_bench_db, open_bench_dbs, train_loss
from scripts.original_checkout import check_checkout
from scripts.repo import child_env
from scripts.timing import rate
from scripts.utilisation import bench_utilisation
from utils.outputs import write_json


class PlainImages:
    """The original's image path: full decode, float32 on the CPU, box-by-box padding."""

    def __init__(self, img_db):
        self.db = img_db

    def load(self, fnames):
        feats, poss, nbbs = [], [], []
        for f in fnames:
            arrays = msgpack.unpackb(bytes(self.db.txn.get(f.encode())), raw=False)  # every array
            arrays = {k: np.frombuffer(v[b"data"], dtype=v[b"type"]).reshape(v[b"shape"]) for k, v in arrays.items()}
            nbb = self.db.name2nbb[f]
            feat = torch.tensor(arrays["features"][:nbb]).float()
            bb = torch.tensor(arrays["norm_bb"][:nbb]).float()
            feats.append(feat)
            poss.append(box_position_features(bb))
            nbbs.append(nbb)
        return pad_tensors(feats, nbbs), pad_tensors(poss, nbbs), nbbs


def bench_loader(root, min_time):
    txt, img = open_bench_dbs(root)
    text_side = ItmRankDatasetHardNegFromText(txt, img, 399)
    image_side = ItmRankDatasetHardNegFromImage(txt, img, 399)
    plain = PlainImages(img)
    random.seed(0)
    names = [random.sample(text_side.img_name_list, 400) for _ in range(8)]
    fast_out = text_side.image_features(names[0])
    plain_out = plain.load(names[0])
    assert torch.equal(fast_out[0].float(), plain_out[0]) and torch.equal(fast_out[1], plain_out[1])
    it = iter(range(10 ** 9))
    out = {
        "text_side_micro_batches_per_s": rate(lambda: text_side[next(it) % len(text_side)], min_time),
        "text_side_plain_micro_batches_per_s": rate(lambda: plain.load(names[next(it) % 8]), min_time),
        "image_side_micro_batches_per_s": rate(lambda: image_side[next(it) % len(image_side)], min_time),
    }
    out["text_side_speedup"] = out["text_side_micro_batches_per_s"] / out["text_side_plain_micro_batches_per_s"]
    # full evaluation: each item is a caption against every image, in mini-batches of 400
    full = ItmEvalDataset(txt, img, 400)

    def plain_eval_item(i):
        return [full.get_batch(i, full.all_img_ids[st:st + 400]) for st in range(0, len(full.all_img_ids), 400)]

    out["eval_items_per_s"] = rate(lambda: full[next(it) % len(full)], min_time)
    out["eval_plain_items_per_s"] = rate(lambda: plain_eval_item(next(it) % len(full)), min_time)
    out["eval_items_speedup"] = out["eval_items_per_s"] / out["eval_plain_items_per_s"]
    return out


def gpu_like_step(batch, dispatch_ops=500, device_s=0.01):
    """What a training micro-step leaves the CPU to do on a GPU: the training loop's thread
    dispatches kernels (many small torch calls), then waits for the device."""
    x = torch.zeros(8)
    for _ in range(dispatch_ops):
        x = x + 1
    time.sleep(device_s)


def bench_streams(root, min_time, n_workers=4):
    """Text-side micro-batches/s as the training loop receives them from a training stream
    with ``n_workers`` loader threads (the default) or processes: drawn as fast as they
    come, and feeding a loop that behaves like GPU training (``gpu_like_step``)."""
    txt, img = open_bench_dbs(root)
    text_side = ItmRankDatasetHardNegFromText(txt, img, 399)
    alone, _ = fed_loop(itertools.repeat(None), gpu_like_step, min_time)
    out = {"gpu_like_loop_unfed_micro_steps_per_s": alone}
    for kind in WORKER_TYPES:
        stream = ResumableStream(text_side, itm_rank_hn_collate, 0, n_workers, worker_type=kind)
        tag = f"stream_{n_workers}_{kind}_workers"
        out[f"{tag}_micro_batches_per_s"] = rate(lambda: next(stream), min_time)
        steps, waiting = fed_loop(stream, gpu_like_step, min_time)
        out[f"{tag}_gpu_like_loop_micro_steps_per_s"] = steps
        out[f"{tag}_gpu_like_loop_waiting"] = waiting
        stream = None  # its workers stop before the next kind's start
    return out


def small_model(fast, hard_size=7):
    """The benchmark's model, with the same weights whatever the fast paths."""
    config = UniterConfig(28996, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=1024, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return UniterForImageTextRetrievalHardNeg(config, 2048, hard_size=hard_size, fast_paths=fast_paths(fast),
                                              objectives=BENCH_OBJECTIVES)


def text_side_batch(root, negatives, seed, IAIS=False, index=0):
    random.seed(seed)
    return ItmRankDatasetHardNegFromText(*open_bench_dbs(root), negatives, IAIS)[index]


def bench_eval(root, min_time):
    batch = text_side_batch(root, 63, seed=0)
    out, scores = {}, {}
    for name, fast in (("fused", True), ("plain", False)):
        model = small_model(fast).eval()
        with torch.no_grad():
            scores[name] = model(batch, "t", compute_loss=False)[0]
            out[f"eval_{name}_pairs_per_s"] = 64 * rate(lambda: model(batch, "t", compute_loss=False), min_time)
    out["eval_max_abs_score_diff"] = (scores["fused"] - scores["plain"]).abs().max().item()
    out["eval_speedup"] = out["eval_fused_pairs_per_s"] / out["eval_plain_pairs_per_s"]
    return out


def bench_train(root, min_time):
    out = {}
    for iais in (False, "singular"):
        batch = text_side_batch(root, 63, seed=1, IAIS=iais, index=3)
        losses = {}
        for name, fast in (("fused", True), ("plain", False)):
            model = small_model(fast).train()

            def step():
                model.zero_grad()
                loss = train_loss(model, batch, iais)
                loss.backward()
                return loss

            losses[name] = step().item()
            out[f"train_{'iais' if iais else 'plain_loss'}_{name}_steps_per_s"] = rate(step, min_time)
        key = "iais" if iais else "plain_loss"
        out[f"train_{key}_speedup"] = out[f"train_{key}_fused_steps_per_s"] / out[f"train_{key}_plain_steps_per_s"]
        out[f"train_{key}_loss_diff"] = abs(losses["fused"] - losses["plain"])
    return out


def bench_original(root, original_repo, min_time, results):
    """Runs the original code on the same DBs and weights in a separate process (its
    ``data`` and ``model`` packages would clash with this project's)."""
    work = tempfile.mkdtemp(prefix="iais_bench_original_")
    weights, scores, output = (join(work, name) for name in ("weights.pt", "scores.pt", "original.json"))
    torch.save(small_model(True).state_dict(), weights)
    script = join(dirname(abspath(__file__)), "bench_original.py")
    res = subprocess.run([sys.executable, script, "--original_repo", original_repo, "--data", root,
                          "--weights", weights, "--scores", scores, "--output", output,
                          "--min_time", str(min_time)], capture_output=True, text=True,
                         env=child_env())
    if res.returncode != 0:
        lines = res.stderr.strip().splitlines() or ["no output"]
        raise SystemExit(f"bench.py: error: the original code failed on the benchmark: {lines[-1]}")
    with open(output) as f:
        out = json.load(f)
    original = torch.load(scores, weights_only=True)
    for name in ("text_side_micro_batches_per_s", "image_side_micro_batches_per_s", "eval_items_per_s",
                 "eval_fused_pairs_per_s",
                 "train_plain_loss_fused_steps_per_s", "train_iais_fused_steps_per_s"):
        out[f"{name.replace('_fused', '').replace('_per_s', '')}_vs_original"] = (
            results[name] / out["original_" + name.replace("_fused", "")])
    with torch.no_grad():
        ours = small_model(True).eval()(text_side_batch(root, 63, seed=0), "t", compute_loss=False)[0]
    out["original_eval_max_abs_score_diff"] = (ours - original["eval_scores"]).abs().max().item()
    for key, iais in (("plain_loss", False), ("iais", "singular")):
        loss = train_loss(small_model(True).train(), text_side_batch(root, 63, seed=1, IAIS=iais, index=3), iais)
        out[f"original_train_{key}_loss_diff"] = abs(loss.item() - original[f"train_{key}_loss"].item())
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", default="bench_out/bench.json", help="JSON results")
    p.add_argument("--data", default=None, help="where to build the benchmark DBs (default: a temp dir)")
    p.add_argument("--n_images", type=int, default=600, help="images in the generated img_db")
    p.add_argument("--min_time", type=float, default=3.0, help="seconds per measurement")
    p.add_argument("--original_repo", default=None,
                   help="a checkout of lancopku/IAIS: also run the original code on the CPU workloads")
    p.add_argument("--gpu", action="store_true", help="also measure UNITER-base on the GPU")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the GPU's dense bf16/fp16 peak in TFLOP/s for MFU (default: from the device name, "
                        "e.g. H100 SXM and H200 989)")
    opts = p.parse_args()
    if opts.original_repo:
        check_checkout(opts.original_repo, "bench.py")
    torch.set_num_threads(os.cpu_count())
    root = opts.data or join(tempfile.gettempdir(), "iais_bench_db")
    st = time.time()
    make_bench_db(root, opts.n_images)
    results = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
               "db_build_s": time.time() - st}
    results.update(bench_loader(root, opts.min_time))
    results.update(bench_streams(root, opts.min_time))
    results.update(bench_eval(root, opts.min_time))
    results.update(bench_train(root, opts.min_time))
    base = UniterConfig.from_json_file(join(dirname(dirname(abspath(__file__))), "config", "uniter-base.json"))
    results.update(bench_utilisation(torch.device("cpu"), base, opts.min_time))
    if opts.original_repo:
        results.update(bench_original(root, opts.original_repo, opts.min_time, results))
    if opts.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("bench.py: error: --gpu given but torch sees no CUDA device")
        from scripts.bench_device import bench_device, bench_evaluation, peak_tflops_of, training_stream
        device = torch.device("cuda")
        peak = opts.peak_tflops or peak_tflops_of(torch.cuda.get_device_name())
        results.update(bench_device(device, base, opts.min_time, peak_tflops=peak,
                                    stream=training_stream(root, device)))
        results.update(bench_evaluation(root, device, base, opts.min_time, peak_tflops=peak))
        results.update(bench_utilisation(device, base, opts.min_time, n=400, hard=31))
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    os.makedirs(dirname(abspath(opts.output)), exist_ok=True)
    write_json(opts.output, results, indent=2)
    for k, v in results.items():
        print(f"{k:45s} {v:.4g}" if isinstance(v, float) else f"{k:45s} {v}")


if __name__ == "__main__":
    main()
