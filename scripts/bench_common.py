"""What the benchmarks share: the synthetic DBs in the release layout, the models with and
without the fast paths, the hard-negative training loss, synthetic UNITER batches and the
fed loop that measures a step against its data stream."""
import time
from os.path import exists, join

import numpy as np
import torch

from data import ImgDbWriter, TxtTokLmdb, open_img_db, write_txt_db
from engine.train_step import hard_batch_loss
from model import FastPaths, UniterConfig, UniterForImageTextRetrievalHardNeg, build_objectives
from utils.row_lengths import RowLengths

# every benchmark model computes IAIS singular when its batch is aligned
BENCH_OBJECTIVES = build_objectives(["iais-singular"])


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


def open_bench_dbs(root):
    return TxtTokLmdb(join(root, "txt"), 60), open_img_db(join(root, "img"), 0.2, 100, 10, 36, False)


def fed_loop(stream, step, min_time):
    """(micro-steps/s of ``step(batch)`` fed by ``stream``, fraction of the time spent
    waiting for a batch)."""
    for _ in range(3):
        step(next(stream))
    waited, n, st = 0.0, 0, time.perf_counter()
    while n < 3 or time.perf_counter() - st < min_time:
        t = time.perf_counter()
        batch = next(stream)
        waited += time.perf_counter() - t
        step(batch)
        n += 1
    elapsed = time.perf_counter() - st
    return n / elapsed, waited / elapsed


def fast_paths(fast, buckets=16):
    """The project's fast paths, or (fast=False) the original's computation: eager attention
    and four IAIS passes, one padded pass for scoring, every position through the last layer."""
    return FastPaths(length_buckets=buckets) if fast else FastPaths.original()


def train_loss(model, batch, iais):
    """The hard-negative ranking loss of a text-side batch, plus (``iais`` true) the IAIS
    loss of the model's objectives (:data:`BENCH_OBJECTIVES`) at full weight."""
    loss, _ = hard_batch_loss(model, batch, "t", "L" if iais else None, {"self_attn_loss": 1.0}, positives=1)
    return loss


def without_dropout(config):
    """A copy of the UniterConfig ``config`` with dropout off: rates are measured on the
    deterministic computation, and the caller's config stays as it is."""
    return UniterConfig.from_dict({**config.to_dict(), "hidden_dropout_prob": 0.0,
                                   "attention_probs_dropout_prob": 0.0})


def device_sync(device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def seeded_model(cls, config, device, **kwargs):
    torch.manual_seed(0)
    return cls(config, 2048, **kwargs).to(device)


def hard_negative_model(config, device, hard, fast):
    """The training model with the fast paths (length buckets of 32) or the original's."""
    return seeded_model(UniterForImageTextRetrievalHardNeg, config, device, hard_size=hard,
                         fast_paths=fast_paths(fast, 32), objectives=BENCH_OBJECTIVES)


def synthetic_batch(config, device, n, txt_len, num_bb):
    """One caption of ``txt_len`` tokens against ``n`` images of ``num_bb`` boxes (random,
    seeded), in the padded layout with the masks IAIS reads."""
    g = torch.Generator().manual_seed(0)
    seq = txt_len + num_bb
    words = torch.arange(seq)[None].expand(n, -1)
    batch = {"input_ids": torch.randint(106, config.vocab_size, (1, txt_len), generator=g),
             "position_ids": torch.arange(txt_len)[None],
             "img_feat": torch.randn(n, num_bb, 2048, generator=g).half(),
             "img_pos_feat": torch.rand(n, num_bb, 7, generator=g),
             "attn_masks": torch.ones(n, seq, dtype=torch.long), "gather_index": words.clone(),
             "txt_attn_masks": ((words >= 1) & (words < txt_len - 1)).long()[:1],
             "img_attn_masks": (words >= txt_len).long()[:1]}
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["lengths"] = RowLengths.of_layout([txt_len] * n, [num_bb] * n, padded=True, mask_rows=slice(0, 1))
    return batch
