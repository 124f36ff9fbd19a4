"""Throughput of the hot paths against the project's plain path, measured in one run.

    python scripts/bench.py --output bench_out/bench.json        # (make bench)

CPU workloads (the figures of the original on this machine class are in the README):
  text_side   ItmRankDatasetHardNegFromText, negative_size 399: micro-batches/s
  image_side  ItmRankDatasetHardNegFromImage, negative_size 399: micro-batches/s
  eval        no-grad scoring, 4 layers / 256 hidden / 4 heads, 1 text x 64 images: pairs/s
  train       hard-negative step (63 negatives -> 7 hard, forward + backward), with and
              without IAIS: steps/s
The plain path is what the original does: decode every array (soft_labels included),
convert to float32, pad box by box, eager attention, four IAIS attention passes. Values
of both paths are compared. With --gpu (and a GPU), UNITER-base scoring and training are
measured too, with model FLOP utilisation.
"""
import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from os.path import abspath, dirname, exists, join

import msgpack
import numpy as np
import torch

sys.path.insert(0, dirname(dirname(abspath(__file__))))
from data import (DetectFeatLmdb, ImgDbWriter, ItmRankDatasetHardNegFromImage,  # noqa: E402
                  ItmRankDatasetHardNegFromText, TxtTokLmdb, pad_tensors, write_txt_db)
from data.itm import box_position_features  # noqa: E402
from model import UniterConfig, UniterForImageTextRetrievalHardNeg  # noqa: E402


def make_bench_db(root, n_images, seed=0):
    """img_db with 10-100 boxes per image (soft_labels present, plain msgpack) + txt_db."""
    rng = np.random.default_rng(seed)
    if exists(join(root, "txt", "data.mdb")):
        return
    with ImgDbWriter(join(root, "img"), 0.2, 100, 10, 36, compress=False) as w:
        for i in range(n_images):
            n = int(rng.integers(10, 101))
            w.put(f"img{i:06d}.npz", {"features": rng.standard_normal((n, 2048), dtype=np.float32),
                                      "norm_bb": rng.random((n, 6)), "conf": rng.uniform(0.3, 1, n),
                                      "soft_labels": rng.random((n, 1601))})
    examples = {f"t{i:06d}_{k}": {"input_ids": rng.integers(106, 28996, int(rng.integers(8, 30))).tolist(),
                                  "img_fname": f"img{i:06d}.npz"} for i in range(n_images) for k in range(5)}
    write_txt_db(join(root, "txt"), examples, {"CLS": 101, "SEP": 102, "MASK": 103, "UNK": 100,
                                               "v_range": [106, 28996], "toker": "bert-base-cased"})


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


def rate(fn, min_time=3.0, min_iters=3):
    fn()  # warm-up
    n, st = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - st < min_time:
        fn()
        n += 1
    return n / (time.perf_counter() - st)


def bench_loader(root, min_time):
    txt = TxtTokLmdb(join(root, "txt"), 60)
    img = DetectFeatLmdb(join(root, "img"), 0.2, 100, 10, 36, False)
    text_side = ItmRankDatasetHardNegFromText(txt, img, 399)
    image_side = ItmRankDatasetHardNegFromImage(txt, img, 399)
    plain = PlainImages(img)
    random.seed(0)
    names = [random.sample(text_side.img_name_list, 400) for _ in range(8)]
    fast_out = text_side._get_img_feats(names[0])
    plain_out = plain.load(names[0])
    assert torch.equal(fast_out[0].float(), plain_out[0]) and torch.equal(fast_out[1], plain_out[1])
    it = iter(range(10 ** 9))
    out = {
        "text_side_micro_batches_per_s": rate(lambda: text_side[next(it) % len(text_side)], min_time),
        "text_side_plain_micro_batches_per_s": rate(lambda: plain.load(names[next(it) % 8]), min_time),
        "image_side_micro_batches_per_s": rate(lambda: image_side[next(it) % len(image_side)], min_time),
    }
    out["text_side_speedup"] = out["text_side_micro_batches_per_s"] / out["text_side_plain_micro_batches_per_s"]
    return out


def small_model(fused, hard_size=7):
    config = UniterConfig(28996, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=1024, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return UniterForImageTextRetrievalHardNeg(config, 2048, hard_size=hard_size).set_fused_attention(fused)


def eval_batch(root, n_images, seed=0):
    txt = TxtTokLmdb(join(root, "txt"), 60)
    img = DetectFeatLmdb(join(root, "img"), 0.2, 100, 10, 36, False)
    random.seed(seed)
    ds = ItmRankDatasetHardNegFromText(txt, img, n_images - 1)
    return ds, ds[0]


def bench_eval(root, min_time):
    _, batch = eval_batch(root, 64)
    out, scores = {}, {}
    for name, fused in (("fused", True), ("plain", False)):
        model = small_model(fused).eval()
        model.length_buckets = 16 if fused else 0
        model.first_token_only = fused
        with torch.no_grad():
            scores[name] = model(batch, "t", compute_loss=False)
            out[f"eval_{name}_pairs_per_s"] = 64 * rate(lambda: model(batch, "t", compute_loss=False), min_time)
    out["eval_max_abs_score_diff"] = (scores["fused"] - scores["plain"]).abs().max().item()
    out["eval_speedup"] = out["eval_fused_pairs_per_s"] / out["eval_plain_pairs_per_s"]
    return out


def bench_train(root, min_time):
    out = {}
    for iais in (False, "singular"):
        txt = TxtTokLmdb(join(root, "txt"), 60)
        img = DetectFeatLmdb(join(root, "img"), 0.2, 100, 10, 36, False)
        random.seed(1)
        batch = ItmRankDatasetHardNegFromText(txt, img, 63, iais)[3]
        variant = f"L-{iais}" if iais else False
        losses = {}
        for name, fused in (("fused", True), ("plain", False)):
            model = small_model(fused).train()
            model.length_buckets = 16 if fused else 0
            model.first_token_only = fused

            def step():
                model.zero_grad()
                out_ = model(batch, "t", IAIS=variant)
                loss = out_[0].mean() + out_[1]["self_attn_loss"] if iais else out_.mean()
                loss.backward()
                return loss

            losses[name] = step().item()
            out[f"train_{'iais' if iais else 'plain_loss'}_{name}_steps_per_s"] = rate(step, min_time)
        key = "iais" if iais else "plain_loss"
        out[f"train_{key}_speedup"] = out[f"train_{key}_fused_steps_per_s"] / out[f"train_{key}_plain_steps_per_s"]
        out[f"train_{key}_loss_diff"] = abs(losses["fused"] - losses["plain"])
    return out


def bench_gpu(min_time):
    """UNITER-base on a GPU: no-grad scoring of 400 pairs and a hard-negative training step."""
    device = torch.device("cuda")
    config = UniterConfig.from_json_file(join(dirname(dirname(abspath(__file__))), "config", "uniter-base.json"))
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    out = {"gpu": torch.cuda.get_device_name()}
    n, tl, nbb = 400, 22, 60
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(106, 28996, (1, tl), generator=g), "position_ids": torch.arange(tl)[None],
             "img_feat": torch.randn(n, nbb, 2048, generator=g).half(), "img_pos_feat": torch.rand(n, nbb, 7, generator=g),
             "attn_masks": torch.ones(n, tl + nbb, dtype=torch.long), "gather_index": torch.arange(tl + nbb).repeat(n, 1)}
    batch = {k: v.to(device) for k, v in batch.items()}
    seq = tl + nbb
    # forward FLOPs per pair: 2 * params-in-matmuls * tokens + attention (4 * seq^2 * hidden per layer)
    h, L, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    matmul_params = L * (4 * h * h + 2 * h * inter) + 2048 * h
    flops_per_pair = 2 * matmul_params * seq + L * 4 * seq * seq * h
    peak = float(os.environ.get("GPU_PEAK_TFLOPS", "989")) * 1e12  # H100 SXM dense bf16
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for fused in (True, False):
            model = UniterForImageTextRetrievalHardNeg(config, 2048, hard_size=31).to(device).eval()
            model.set_fused_attention(fused)

            def score():
                with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
                    model(batch, "t", compute_loss=False)
            torch.cuda.synchronize()
            r = rate(lambda: (score(), torch.cuda.synchronize()), min_time)
            tag = f"gpu_score_{dtype_name}_{'fused' if fused else 'plain'}"
            out[f"{tag}_pairs_per_s"] = r * n
            out[f"{tag}_mfu"] = r * n * flops_per_pair / peak
    out["gpu_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", default="bench_out/bench.json", help="JSON results")
    p.add_argument("--data", default=None, help="where to build the benchmark DBs (default: a temp dir)")
    p.add_argument("--n_images", type=int, default=600, help="images in the generated img_db")
    p.add_argument("--min_time", type=float, default=3.0, help="seconds per measurement")
    p.add_argument("--gpu", action="store_true", help="also measure UNITER-base on the GPU")
    opts = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    root = opts.data or join(tempfile.gettempdir(), "iais_bench_db")
    st = time.time()
    make_bench_db(root, opts.n_images)
    results = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
               "db_build_s": time.time() - st}
    results.update(bench_loader(root, opts.min_time))
    results.update(bench_eval(root, opts.min_time))
    results.update(bench_train(root, opts.min_time))
    if opts.gpu and torch.cuda.is_available():
        results.update(bench_gpu(opts.min_time))
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    os.makedirs(dirname(abspath(opts.output)), exist_ok=True)
    with open(opts.output, "w") as f:
        json.dump(results, f, indent=2)
    for k, v in results.items():
        print(f"{k:45s} {v:.4g}" if isinstance(v, float) else f"{k:45s} {v}")


if __name__ == "__main__":
    main()
