"""Fine-tune UNITER for image-text retrieval with hard negatives, optionally with IAIS.

    horovodrun -np 8 python train_itm_hard_negatives.py --config config/train-itm-flickr-base-8gpu-hn.json --IAIS singular
    torchrun --nproc_per_node 8 train_itm_hard_negatives.py --config ... --IAIS distributed
    python train_itm_hard_negatives.py --config config/train-itm-demo.json --IAIS singular   # one process, GPU or CPU

Each micro-step trains on an image-side hard batch (one image, its caption and the hardest
captions of other images, with the visual IAIS variant) and a text-side hard batch (one
caption, its image and the hardest other images, with the linguistic variant); gradients
are accumulated over ``train_batch_size`` micro-steps and averaged over processes.
"""
import json
import os
from os.path import exists, join
from time import time

import torch
from torch.nn.utils import clip_grad_norm_
from torch.utils.data import ConcatDataset
from tqdm import tqdm

from data import (DataError, WORKER_TYPES, ImageLmdbGroup, ItmEvalDataset, ItmRankDatasetHardNegFromImage,
                  ItmRankDatasetHardNegFromText, ItmValDataset, PrefetchLoader, ResumableStream,
                  TxtTokLmdb, itm_eval_collate, itm_rank_hn_collate, itm_val_collate, make_loader)
from data.groups import read_image_groups
from model import IMG_DIM, IaisVariant, UniterForImageTextRetrievalHardNeg
from utils import distributed as dist
from utils.checkpoint import (latest_training_state, load_model_state, restore_training_state, save_model,
                              save_training_state)
from utils.checks import check_split, load_model
from utils.cli import TrainingError, run
from utils.config import (NON_NEGATIVE, POSITIVE, PROBABILITY, ConfigError, Range, add_box_args, load_json,
                          make_parser)
from utils.itm_eval import add_counting_arg, evaluate, format_recall_table, validate
from utils.retrieval_metrics import counting_name
from utils.logger import LOGGER, RunningMeter, TensorBoardLogger, add_log_to_file, setup_logging
from utils.misc import LOCK_NAME, lock_dir, rng_state, set_dropout, set_random_seed
from utils.optim import build_optimizer, get_lr_sched, tsa_weight
from utils.precision import autocast, make_scaler, resolve_amp

CONFIG_ONLY_KEYS = {"train_txt_dbs": "paths", "train_img_dbs": "paths", "val_txt_db": "path", "val_img_db": "path",
                    "test_txt_db": "path", "test_img_db": "path", "model_config": "path"}


def build_parser():
    p = make_parser(__doc__.split("\n")[0])
    a = p.add_argument
    add_box_args(p)
    a("--checkpoint", type=str, default=None, help="initial weights (pre-trained UNITER .pt)")
    a("--output_dir", type=str, default=None, help="where logs, checkpoints and results go")
    a("--max_txt_len", type=int, default=60, valid=POSITIVE, help="drop training captions longer than this")
    a("--train_batch_size", type=int, default=32, valid=POSITIVE,
      help="positives per optimizer step (gradient accumulation)")
    a("--negative_size", type=int, default=511, valid=POSITIVE, help="negatives scored per positive (no gradient)")
    a("--hard_neg_size", type=int, default=31, valid=POSITIVE, help="hardest negatives trained on per positive")
    a("--inf_minibatch_size", type=int, default=512, valid=POSITIVE, help="images per forward in validation/evaluation")
    a("--margin", type=float, default=0.2, valid=NON_NEGATIVE, help="margin of the ranking loss")
    a("--learning_rate", type=float, default=3e-5, valid=Range(0, low_open=True), help="peak learning rate")
    a("--valid_steps", type=int, default=1000, valid=POSITIVE, help="validate and checkpoint every N optimizer steps")
    a("--num_train_steps", type=int, default=100000, valid=POSITIVE, help="optimizer steps in all")
    a("--optim", default="adam", choices=["adam", "adamax", "adamw"], help="optimizer")
    a("--betas", type=float, nargs="+", default=[0.9, 0.98], valid=PROBABILITY, help="Adam betas")
    a("--dropout", type=float, default=0.1, valid=PROBABILITY, help="dropout probability of every dropout layer")
    a("--weight_decay", type=float, default=0.01, valid=NON_NEGATIVE, help="weight decay (not on bias/LayerNorm)")
    a("--grad_norm", type=float, default=0.25, valid=Range(0, low_open=True, also=(-1,)),
      help="gradient clipping norm (-1: off)")
    a("--warmup_steps", type=int, default=4000, valid=NON_NEGATIVE, help="linear learning-rate warm-up steps")
    a("--seed", type=int, default=42, valid=Range(0, 2**32 - 1), help="random seed")
    a("--full_val", action="store_true", help="full R@K evaluation at every validation")
    add_counting_arg(p)
    a("--fp16", action="store_true", help="mixed precision (float16 + loss scaling on GPU, bfloat16 on CPU)")
    a("--amp_dtype", choices=["fp16", "bf16"], default=None,
      help="mixed-precision dtype: bf16 (no loss scaling) or fp16 (with loss scaling, kept even on a CPU); "
           "default fp16 with --fp16")
    a("--n_workers", type=int, default=4, valid=NON_NEGATIVE,
      help="data loader workers per stream (0: in the training loop)")
    a("--worker_type", choices=WORKER_TYPES, default="thread",
      help="data loader workers are threads (default: batches handed over without a copy) or processes")
    a("--pin_mem", action="store_true", help="pin host memory of batches")
    a("--config", type=str, default=None, help="JSON config; flags on the command line win")
    a("--IAIS", default=False, choices=["singular", "distributed", False],
      help="IAIS alignment: singular or distributed (default: off)")
    a("--negative_groups", type=str, default=None,
      help="JSON groups of confusable images: each image's group members (text side) and their captions "
           "(image side) are always among its negatives")
    a("--fix_image_side_masks", action="store_true",
      help="image-side hard batches without IAIS get the masks of their padded layout (the original's let "
           "shorter captions attend to [PAD] and lose the image's last regions)")
    a("--resume", action="store_true", help="continue from the last training state in output_dir")
    a("--max_skipped_steps", type=int, default=100,
      valid=POSITIVE, help="stop after this many consecutive steps with non-finite gradients")
    a("--collective_timeout", type=int, default=600,
      valid=POSITIVE, help="seconds before a distributed collective gives up (a dead rank stops the others)")
    a("--allow_random_init", action="store_true",
      help="train even when --checkpoint leaves part of the model at random initialisation")
    return p


def check_options(opts):
    missing = [k for k in ("output_dir", "model_config", "train_txt_dbs", "train_img_dbs",
                           "val_txt_db", "val_img_db", "test_txt_db", "test_img_db")
               if getattr(opts, k) in (None, [], "")]
    if missing:
        raise ConfigError(f"missing setting {missing[0]} (give it in --config"
                          f"{' or as --' + missing[0] if missing[0] == 'output_dir' else ''})")
    if len(opts.train_txt_dbs) != len(opts.train_img_dbs):
        raise ConfigError(f"train_txt_dbs has {len(opts.train_txt_dbs)} entries but train_img_dbs "
                          f"{len(opts.train_img_dbs)}; they are used in pairs")
    max_boxes = opts.num_bb if opts.conf_th == -1 else opts.max_bb
    if max_boxes + opts.max_txt_len + 2 > 512:
        raise ConfigError(f"max_txt_len {opts.max_txt_len} + 2 special tokens + {max_boxes} boxes "
                          f"exceed UNITER's 512 positions; lower --max_txt_len or the box count")
    if (opts.negative_size + 1) % 8 or (opts.hard_neg_size + 1) % 8:
        raise ConfigError(f"negative_size + 1 ({opts.negative_size + 1}) and hard_neg_size + 1 "
                          f"({opts.hard_neg_size + 1}) must be multiples of 8 (tensor-core friendly batches)")
    if opts.hard_neg_size > opts.negative_size:
        raise ConfigError(f"hard_neg_size {opts.hard_neg_size} exceeds negative_size {opts.negative_size}")
    if len(opts.betas) != 2:
        raise ConfigError(f"--betas takes two numbers, got {opts.betas}")
    if opts.conf_th != -1 and opts.min_bb > opts.max_bb:
        raise ConfigError(f"--min_bb {opts.min_bb} exceeds --max_bb {opts.max_bb}")


_RUN_FOLDERS = {"log", "ckpt", "results_test", LOCK_NAME}


def _started_without_checkpoint(output_dir):
    """Whether ``output_dir`` holds only what a run leaves before its first checkpoint."""
    entries = set(os.listdir(output_dir))
    ckpt, results = join(output_dir, "ckpt"), join(output_dir, "results_test")
    return (entries <= _RUN_FOLDERS and latest_training_state(ckpt) is None
            and not (os.path.isdir(results) and os.listdir(results)))


def prepare_output_dir(opts):
    """Whether to resume. A non-empty output_dir is refused unless resuming (nothing of a
    previous run is touched); one left by a run stopped before its first checkpoint starts
    afresh, with or without --resume."""
    if exists(opts.output_dir) and not os.path.isdir(opts.output_dir):
        raise ConfigError(f"output_dir {opts.output_dir} exists and is not a directory")
    if opts.resume and latest_training_state(join(opts.output_dir, "ckpt")) is not None:
        return True
    if not exists(opts.output_dir) or _started_without_checkpoint(opts.output_dir):
        if opts.resume:
            LOGGER.warning("--resume: %s holds no training state yet (the run stopped before its first "
                           "checkpoint); starting from step 0", opts.output_dir)
        return False
    if opts.resume:
        raise ConfigError(f"--resume: no training state in {opts.output_dir}/ckpt to resume from")
    raise ConfigError(f"output_dir {opts.output_dir} is not empty; choose a new one or pass --resume")


def claim_output_dir(opts):
    """Create and lock output_dir for this run's life, then decide again (another run may
    have written there since the first look)."""
    os.makedirs(opts.output_dir, exist_ok=True)
    lock_dir(opts.output_dir)
    return prepare_output_dir(opts)


def decide_on_every_rank(decide):
    """Rank 0 runs ``decide()``; every rank gets its result, or raises the same error, so
    that a user's mistake stops all ranks with one line instead of leaving them waiting."""
    outcome = None
    if dist.is_main_process():
        try:
            outcome = ("ok", decide())
        except (ConfigError, OSError) as e:
            outcome = ("error", str(e))
    kind, value = dist.all_gather_object(outcome)[0]
    if kind == "error":
        raise ConfigError(value)
    return value


def build_model(opts, device):
    model, _ = load_model(UniterForImageTextRetrievalHardNeg, opts.model_config, opts.checkpoint,
                          opts.allow_random_init, img_dim=IMG_DIM, margin=opts.margin, hard_size=opts.hard_neg_size)
    model.init_output()  # the ranking head starts from the pre-trained ITM head
    set_dropout(model, opts.dropout)
    return model.to(device)


def build_datasets(opts):
    img_dbs = ImageLmdbGroup(opts.conf_th, opts.max_bb, opts.min_bb, opts.num_bb, opts.compressed_db)
    iais = opts.IAIS or False
    groups = read_image_groups(opts.negative_groups) if opts.negative_groups else None
    text_side, image_side = [], []
    for txt_path, img_path in zip(opts.train_txt_dbs, opts.train_img_dbs):
        txt_db, img_db = TxtTokLmdb(txt_path, opts.max_txt_len), img_dbs[img_path]
        text_side.append(ItmRankDatasetHardNegFromText(txt_db, img_db, opts.negative_size, iais, groups))
        image_side.append(ItmRankDatasetHardNegFromImage(txt_db, img_db, opts.negative_size, iais, groups,
                                                         padded_masks=opts.fix_image_side_masks))
    if groups and not any(d.image_groups for d in text_side):
        raise DataError(f"negative_groups {opts.negative_groups}: none of its images is in the training data; "
                        f"check that it names images as the txt_db does (img_fname)")
    val_txt = TxtTokLmdb(opts.val_txt_db, -1)
    val_img = img_dbs[opts.val_img_db]
    return {"text": ConcatDataset(text_side), "image": ConcatDataset(image_side),
            "val": ItmValDataset(val_txt, val_img, opts.inf_minibatch_size),
            "val_full": ItmEvalDataset(val_txt, val_img, opts.inf_minibatch_size),
            "test": ItmEvalDataset(TxtTokLmdb(opts.test_txt_db, -1), img_dbs[opts.test_img_db],
                                   opts.inf_minibatch_size)}


def eval_loader(dataset, collate_fn, opts, device):
    return PrefetchLoader(make_loader(dataset, collate_fn, opts.n_workers, opts.pin_mem, opts.worker_type), device)


def hard_batch_loss(model, batch, sample_from, variant, tsa, opts):
    """Loss of one hard batch: rank_loss / train_batch_size (+ IAIS loss * TSA weight)."""
    rank_loss, losses = model(batch, sample_from=sample_from, compute_loss=True, IAIS=variant)
    rank_loss = rank_loss.mean() / opts.train_batch_size
    if variant is None:
        return rank_loss, {}
    return rank_loss + losses["self_attn_loss"] * tsa, {"rank_loss": rank_loss, **losses}


def main(opts):
    check_options(opts)
    device = dist.init(opts.collective_timeout)
    is_main = dist.is_main_process()
    setup_logging(is_main)
    opts.resume = decide_on_every_rank(lambda: prepare_output_dir(opts))
    amp_dtype, use_scaler = resolve_amp(opts.fp16, opts.amp_dtype, device)
    LOGGER.info("device %s, %d process(es) via %s, mixed precision: %s%s", device, dist.get_world_size(),
                dist.backend_name(), amp_dtype or "off", " with loss scaling" if use_scaler else "")
    set_random_seed(opts.seed)

    # data and weights are checked before anything is written to output_dir
    dsets = build_datasets(opts)
    model = build_model(opts, device)
    for dset in dsets["text"].datasets + [dsets["val"], dsets["test"]]:
        check_split(dset.txt_db, dset.img_db, model.config, IMG_DIM)
    opts.resume = decide_on_every_rank(lambda: claim_output_dir(opts))

    ckpt_dir, log_dir = join(opts.output_dir, "ckpt"), join(opts.output_dir, "log")
    if is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
        os.makedirs(log_dir, exist_ok=True)
        os.makedirs(join(opts.output_dir, "results_test"), exist_ok=True)
        add_log_to_file(join(log_dir, "log.txt"))
        if not opts.resume:
            with open(join(log_dir, "hps.json"), "w") as f:
                json.dump(vars(opts), f, indent=4)
            with open(join(log_dir, "model.json"), "w") as f:
                json.dump(load_json(opts.model_config, "model config"), f, indent=4)
    tb = TensorBoardLogger(log_dir if is_main else None)
    dist.broadcast_parameters(model)
    optimizer = build_optimizer(model, opts)
    scaler = make_scaler(device, use_scaler)
    # each rank and side shuffles and draws negatives from its own seed
    stream_seed = 2 * (opts.seed * 1000 + dist.get_rank())
    streams = {side: ResumableStream(dsets[side], itm_rank_hn_collate, stream_seed + k,
                                     opts.n_workers, opts.pin_mem, device, opts.worker_type)
               for k, side in enumerate(("text", "image"))}
    val_loader = eval_loader(dsets["val"], itm_val_collate, opts, device)
    full_val_loader = eval_loader(dsets["val_full"], itm_eval_collate, opts, device)
    test_loader = eval_loader(dsets["test"], itm_eval_collate, opts, device)

    global_step = 0
    if opts.resume:
        _, model_path, state_path = latest_training_state(ckpt_dir)
        model.load_state_dict(load_model_state(model_path))
        global_step = restore_training_state(state_path, optimizer, scaler, streams, dist.get_rank())
        LOGGER.info("resumed from %s at step %d", state_path, global_step)

    n_params = sum(p.numel() for p in model.parameters())
    LOGGER.info("data loader: %s", f"{opts.n_workers} worker {opts.worker_type}(s) per stream"
                if opts.n_workers > 0 else "batches built in the training loop")
    LOGGER.info("training %d parameters on %d positives per side, %d steps, IAIS: %s", n_params,
                sum(dist.all_gather_object(len(dsets["text"]))), opts.num_train_steps, opts.IAIS or "off")

    def checkpoint(tag):
        # every rank must hold the same weights; a divergence is a bug worth stopping for
        digest = float(sum(p.detach().double().sum() for p in model.parameters()))
        digests = dist.all_gather_object(digest)
        if len(set(digests)) != 1:
            raise TrainingError(f"step {global_step}: parameters differ across ranks ({digests})")
        LOGGER.info("step %d: parameters identical on %d rank(s)", global_step, len(digests))
        if is_main:
            save_model(model, ckpt_dir, tag)
        rngs = dist.all_gather_object(rng_state())
        if is_main and isinstance(tag, int):
            save_training_state(ckpt_dir, tag, {
                "global_step": global_step, "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "rng": rngs,
                "streams": {side: s.state_dict() for side, s in streams.items()}})
        dist.barrier()

    running = {k: RunningMeter(k) for k in ("loss", "rank_loss", "self_attn_loss")}
    pbar = tqdm(total=opts.num_train_steps, initial=global_step, disable=not is_main, desc="train")
    n_examples, skipped, start = 0, 0, time()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    variants = {"image": IaisVariant.of("V", opts.IAIS), "text": IaisVariant.of("L", opts.IAIS)}
    while global_step < opts.num_train_steps:
        tsa = tsa_weight(global_step, opts.num_train_steps).to(device)
        step_loss = 0.0
        for _ in range(opts.train_batch_size):
            for side, sample_from in (("image", "i"), ("text", "t")):
                batch = next(streams[side])
                n_examples += batch["attn_masks"].size(0)
                with autocast(device, amp_dtype):
                    loss, parts = hard_batch_loss(model, batch, sample_from, variants[side], tsa, opts)
                scaler.scale(loss).backward()
                step_loss += loss.item()
                running["loss"](loss.item())
                for k in ("rank_loss", "self_attn_loss"):
                    if k in parts:
                        running[k](parts[k].item())
        global_step += 1
        grads = [p.grad for p in params if p.grad is not None]
        dist.all_reduce_mean(grads)
        lr = get_lr_sched(global_step, opts)
        for group in optimizer.param_groups:
            group["lr"] = lr
        scaler.unscale_(optimizer)
        if opts.grad_norm != -1:
            grad_norm = clip_grad_norm_(params, opts.grad_norm)
        else:
            grad_norm = torch.norm(torch.stack([g.norm() for g in grads]))
        finite = bool(torch.isfinite(grad_norm))
        loss_scale = scaler.get_scale() if use_scaler and not finite else None  # a device sync: only when reported
        if use_scaler:
            scaler.step(optimizer)  # skips the update itself when gradients overflowed
            scaler.update()
        elif finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        skipped = 0 if finite else skipped + 1
        if not finite:
            if use_scaler:
                # dynamic loss scaling starts high on purpose: a few overflows early on are normal
                LOGGER.warning("step %d: gradients overflowed at loss scale %g, update skipped, loss scale "
                               "now %g (%d in a row)", global_step, loss_scale, scaler.get_scale(), skipped)
            else:
                LOGGER.warning("step %d: non-finite gradients, update skipped (%d in a row)", global_step, skipped)
            tb.add_scalar("skipped_steps", skipped, global_step)
            if skipped >= opts.max_skipped_steps:
                raise TrainingError(f"{skipped} consecutive steps had non-finite gradients; "
                                    f"lower --learning_rate or check the data (last good checkpoint is kept)")

        elapsed = time() - start
        ex_per_s = n_examples * dist.get_world_size() / max(elapsed, 1e-9)
        tb.add_scalar("lr", lr, global_step)
        tb.add_scalar("loss_step", step_loss, global_step)
        tb.add_scalar("grad_norm", grad_norm, global_step)
        tb.add_scalar("perf/ex_per_s", ex_per_s, global_step)
        for k, meter in running.items():
            if meter._val is not None:
                tb.add_scalar(k, meter.val, global_step)
        pbar.update(1)
        pbar.set_postfix(loss=f"{running['loss'].val:.4f}", ex_s=f"{ex_per_s:.0f}")

        if global_step % opts.valid_steps == 0 or global_step == opts.num_train_steps:
            with autocast(device, amp_dtype):
                if opts.full_val:
                    val_log = evaluate(model, full_val_loader, original_counting=opts.original_counting)
                    tb.log_scalar_dict(val_log, global_step, "valid/")
                    LOGGER.info("step %d validation:\n%s", global_step,
                                format_recall_table(val_log, opts.original_counting))
                else:
                    tb.log_scalar_dict(validate(model, val_loader), global_step)
            checkpoint(global_step)
    pbar.close()

    with autocast(device, amp_dtype):
        test_log = evaluate(model, test_loader, original_counting=opts.original_counting)
    tb.log_scalar_dict(test_log, global_step, "eval/test_")
    if is_main:
        with open(join(opts.output_dir, "results_test", f"results_{global_step}.json"), "w") as f:
            json.dump({**test_log, "counting": counting_name(opts.original_counting)}, f, indent=2)
        table = format_recall_table(test_log, opts.original_counting)
        LOGGER.info("test split after %d steps:\n%s", global_step, table)
        print(table)
    tb.close()
    dist.shutdown()
    return test_log


if __name__ == "__main__":
    run(main, build_parser(), CONFIG_ONLY_KEYS)
