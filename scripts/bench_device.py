"""UNITER on an accelerator: scoring and training rates, model FLOP utilisation (MFU), the
training step fed by the real loader, and full evaluation as inf_itm.py runs it, projected
to the release's test sets. Used by ``bench.py --gpu`` and ``gpu_check.py``; every
function also runs on a CPU (that is how the code path is tested)."""
import time

import numpy as np
import torch

from data import (ItmEvalDataset, ItmRankDatasetHardNegFromText, PrefetchLoader, ResumableStream,
                  itm_eval_collate, itm_rank_hn_collate, make_loader)
from data.loader import map_tensors
from engine.evaluation import inference
from model import FastPaths, UniterForImageTextRetrieval
from scripts.bench_common import (device_sync, fed_loop, hard_negative_model, open_bench_dbs, seeded_model,
                                  synthetic_batch, train_loss, without_dropout)
from scripts.timing import rate
from scripts.utilisation import forward_flops_per_pair

# dense bf16/fp16 tensor-core peaks in TFLOP/s, by a part of the device name (first match)
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("A10", 125.0), ("L4", 121.0),
               ("V100", 125.0))
# the release's test splits: (captions, images)
TEST_SETS = {"flickr30k_1k": (5000, 1000), "coco_5k": (25010, 5000)}


def peak_tflops_of(device_name):
    """The card's dense bf16 peak from its name, or None when it is not in the table."""
    return next((peak for part, peak in PEAK_TFLOPS if part in device_name), None)


def bench_device(device, config, min_time, n=400, hard=31, txt_len=22, num_bb=60, peak_tflops=None,
                 stream=None):
    """UNITER scoring (``n`` pairs, no grad) and a hard-negative training step with IAIS
    (score ``n``, train ``hard`` + 1) on ``device`` under bf16 and fp16 autocast, with model
    FLOP utilisation when ``peak_tflops`` is given; with a text-side IAIS training ``stream``
    (batches on ``device``), the bf16 training step fed by it and how long it waits for it."""
    config = without_dropout(config)
    sync = device_sync(device)
    batch = synthetic_batch(config, device, n, txt_len, num_bb)
    iais_batch = {k: v for k, v in batch.items() if k != "gather_index"}
    flops = forward_flops_per_pair(config, txt_len, num_bb)
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else device.type}
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for fast in (True, False):
            model = hard_negative_model(config, device, hard, fast)
            tag = f"{dtype_name}_{'fused' if fast else 'plain'}"

            def score():
                with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
                    model.eval()(batch, "t", compute_loss=False)
                sync()

            def train_step():
                model.train().zero_grad()
                with torch.autocast(device.type, dtype=dtype):
                    loss = train_loss(model, iais_batch, "singular")
                loss.backward()
                sync()

            pairs_per_s = n * rate(score, min_time)
            out[f"score_{tag}_pairs_per_s"] = pairs_per_s
            out[f"train_iais_{tag}_steps_per_s"] = rate(train_step, min_time)
            if peak_tflops:
                out[f"score_{tag}_mfu"] = pairs_per_s * flops / (peak_tflops * 1e12)
    if stream is not None:
        model = hard_negative_model(config, device, hard, True).train()

        def fed_step(fed_batch):
            model.zero_grad()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = train_loss(model, fed_batch, "singular")
            loss.backward()
            loss.item()  # the training loop logs the loss: one wait for the device per step

        steps, waiting = fed_loop(stream, fed_step, min_time)
        out["fed_train_iais_bf16_steps_per_s"] = steps
        out["fed_train_waiting_for_loader"] = waiting
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return {f"device_{k}": v for k, v in out.items()}


def training_stream(root, device, negatives=399, n_workers=4):
    """The text-side IAIS training stream as the paper configs train: loader threads,
    batches pinned and copied ahead (on a side CUDA stream on a GPU)."""
    txt, img = open_bench_dbs(root)
    return ResumableStream(ItmRankDatasetHardNegFromText(txt, img, negatives, IAIS="singular"), itm_rank_hn_collate,
                           0, n_workers=n_workers, pin_memory=device.type == "cuda", device=device)


def _eval_dataset(root, n_texts, mini_batch):
    dataset = ItmEvalDataset(*open_bench_dbs(root), mini_batch)
    dataset.ids = dataset.ids[:n_texts]
    txt_lens = np.array([len(dataset.txt_db[i]["input_ids"]) + 2 for i in dataset.ids])  # + [CLS], [SEP]
    num_bbs = np.array([dataset.img_db.name2nbb[i] for i in dataset.all_img_ids])
    return dataset, txt_lens, num_bbs


def bench_evaluation(root, device, config, min_time, n_texts=200, mini_batch=400, n_workers=4,
                     buckets=(0, 32, 100, 200), peak_tflops=None):
    """Full evaluation of ``n_texts`` captions against every image of the bench DB (10-100
    boxes, captions of 10-31 tokens) under fp16 and bf16 autocast: the model alone on one
    caption's mini-batches already on the device, for each length-bucket size (0: one padded
    pass), and the whole pipeline as inf_itm.py runs it (loader threads, image sides uploaded
    once per pass); pairs/s, MFU of the useful FLOPs, and the release test sets projected
    from the pipeline's rate."""
    config = without_dropout(config)
    sync = device_sync(device)
    dataset, txt_lens, num_bbs = _eval_dataset(root, n_texts, mini_batch)
    flops_per_pair = float(forward_flops_per_pair(config, txt_lens[:, None], num_bbs[None, :]).mean())
    # one model per bucket size, all with the same weights
    models = {size: seeded_model(UniterForImageTextRetrieval, config, device, pairs_num=1,
                                  fast_paths=FastPaths(length_buckets=size)).eval() for size in buckets}
    one_caption = [map_tensors(b, lambda t: t.to(device)) for b in dataset[0]]
    one_caption_pairs = len(dataset.all_img_ids)
    one_caption_flops = float(forward_flops_per_pair(config, txt_lens[0], num_bbs).sum())
    out = {"texts": len(dataset), "images": len(dataset.all_img_ids), "mini_batch": mini_batch,
           "flops_per_pair": flops_per_pair}
    for dtype_name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        for size, model in models.items():

            def score_caption():
                with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
                    for b in one_caption:
                        model(b, compute_loss=False)
                sync()

            calls = rate(score_caption, min_time)
            out[f"model_{dtype_name}_buckets{size}_pairs_per_s"] = calls * one_caption_pairs
            if peak_tflops:
                out[f"model_{dtype_name}_buckets{size}_mfu"] = calls * one_caption_flops / (peak_tflops * 1e12)
        best = max(buckets, key=lambda s: out[f"model_{dtype_name}_buckets{s}_pairs_per_s"])
        model = models[best]
        loader = PrefetchLoader(make_loader(dataset, itm_eval_collate, n_workers, device.type == "cuda"), device)
        with torch.autocast(device.type, dtype=dtype):
            inference(model, loader)  # warm-up pass: builds and uploads the image sides
            st = time.perf_counter()
            inference(model, loader)
            sync()
        pairs_per_s = len(dataset) * len(dataset.all_img_ids) / (time.perf_counter() - st)
        out[f"pipeline_{dtype_name}_buckets"] = best
        out[f"pipeline_{dtype_name}_pairs_per_s"] = pairs_per_s
        if peak_tflops:
            out[f"pipeline_{dtype_name}_mfu"] = pairs_per_s * flops_per_pair / (peak_tflops * 1e12)
        for name, (texts, images) in TEST_SETS.items():
            out[f"projected_{name}_{dtype_name}_minutes"] = texts * images / pairs_per_s / 60
    return {f"eval_{k}": v for k, v in out.items()}
