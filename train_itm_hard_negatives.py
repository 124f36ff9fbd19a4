"""Fine-tune UNITER for image-text retrieval with hard negatives, optionally with IAIS.

    horovodrun -np 8 python train_itm_hard_negatives.py --config config/train-itm-flickr-base-8gpu-hn.json --IAIS singular
    torchrun --nproc_per_node 8 train_itm_hard_negatives.py --config ... --IAIS distributed
    python train_itm_hard_negatives.py --config config/train-itm-demo.json --IAIS singular   # one process, GPU or CPU

Each micro-step trains on an image-side hard batch (one image, its caption and the hardest
captions of other images, with the visual IAIS variant) and a text-side hard batch (one
caption, its image and the hardest other images, with the linguistic variant); gradients
are accumulated over ``train_batch_size`` micro-steps and averaged over processes.
"""
import utils.threads  # noqa: F401  (first: sets the OpenMP thread count before torch loads OpenMP)
import sys
from functools import partial
from os.path import join

from torch.utils.data import ConcatDataset

from data import (DataError, WORKER_TYPES, ImageLmdbGroup, ItmEvalDataset, ItmRankDatasetHardNegFromImage,
                  ItmRankDatasetHardNegFromText, ItmValDataset, ResumableStream, TxtTokLmdb, itm_eval_collate,
                  itm_rank_hn_collate, prefetch_loader)
from data.groups import read_image_groups
from engine.checkpointing import TrainingState, resume
from engine.best import BestCheckpoint, resolve_metric
from engine.evaluation import validation_scalars
from engine.interrupts import Interrupted
from engine.output_dir import claim, decided_by_rank0, make_run_folders, should_resume
from engine.run_end import draw_curves_at_end, report_interrupted, test_last_and_best
from engine.run_info import launch_record, now, record_launch
from engine.run_settings import check_resume, record_changes, run_record
from engine.train_step import TrainStep
from engine.training import train
from model import IMG_DIM, OBJECTIVES, UniterForImageTextRetrievalHardNeg, build_objectives
from utils import distributed as dist
from engine.checks import check_split, load_model
from utils.cli import run
from utils.config import (NON_NEGATIVE, POSITIVE, PROBABILITY, ConfigError, Range, add_box_args, add_counting_arg,
                          make_parser)
from utils.logger import LOGGER, TensorBoardLogger, setup_logging
from utils.misc import set_dropout, set_random_seed
from utils.optim import build_optimizer, get_lr_sched
from utils.precision import autocast, make_scaler, resolve_amp

CONFIG_ONLY_KEYS = {"train_txt_dbs": "paths", "train_img_dbs": "paths", "val_txt_db": "path", "val_img_db": "path",
                    "test_txt_db": "path", "test_img_db": "path", "model_config": "path"}


def add_validation_args(a):
    a("--valid_steps", type=int, default=1000, valid=POSITIVE, help="validate and checkpoint every N optimizer steps")
    a("--save_steps", type=int, default=None, valid=POSITIVE,
      help="also checkpoint (without validating) every N optimizer steps; default: only at validations")
    a("--full_val", action="store_true", help="full R@K evaluation at every validation")
    a("--best_metric", type=str, default=None,
      help="validation scalar whose highest value picks ckpt/best.pt (default: the mean recall, "
           "valid/recall_mean, or valid/r_mean with --full_val)")


def build_parser():
    p = make_parser(__doc__.split("\n")[0])
    a = p.add_argument
    add_box_args(p)
    a("--checkpoint", type=str, default=None, help="initial weights (pre-trained UNITER .pt)")
    a("--output_dir", type=str, default=None, help="where logs, checkpoints and results go (required, or in --config)")
    a("--max_txt_len", type=int, default=60, valid=POSITIVE, help="drop training captions longer than this")
    a("--train_batch_size", type=int, default=32, valid=POSITIVE,
      help="positives per optimizer step (gradient accumulation)")
    a("--negative_size", type=int, default=511, valid=POSITIVE, help="negatives scored per positive (no gradient)")
    a("--hard_neg_size", type=int, default=31, valid=POSITIVE, help="hardest negatives trained on per positive")
    a("--inf_minibatch_size", type=int, default=512, valid=POSITIVE, help="images per forward in validation/evaluation")
    a("--margin", type=float, default=0.2, valid=NON_NEGATIVE, help="margin of the ranking loss")
    a("--learning_rate", type=float, default=3e-5, valid=Range(0, low_open=True), help="peak learning rate")
    a("--num_train_steps", type=int, default=100000, valid=POSITIVE, help="optimizer steps in all")
    a("--optim", default="adam", choices=["adam", "adamax", "adamw"], help="optimizer")
    a("--betas", type=float, nargs="+", default=[0.9, 0.98], valid=PROBABILITY, help="Adam betas")
    a("--dropout", type=float, default=0.1, valid=PROBABILITY, help="dropout probability of every dropout layer")
    a("--weight_decay", type=float, default=0.01, valid=NON_NEGATIVE, help="weight decay (not on bias/LayerNorm)")
    a("--grad_norm", type=float, default=0.25, valid=Range(0, low_open=True, also=(-1,)),
      help="gradient clipping norm (-1: off)")
    a("--warmup_steps", type=int, default=4000, valid=NON_NEGATIVE, help="linear learning-rate warm-up steps")
    a("--seed", type=int, default=42, valid=Range(0, 2**32 - 1), help="random seed")
    add_validation_args(a)
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
      help="IAIS alignment: singular or distributed (default: off); the same as --alignment iais-singular "
           "or iais-distributed")
    a("--alignment", nargs="+", default=[], choices=sorted(OBJECTIVES), metavar="NAME",
      help=f"alignment objectives computed in the encoder, each weighted by its own schedule "
           f"({', '.join(sorted(OBJECTIVES))}; model/alignment.py says how to add one)")
    a("--negative_groups", type=str, default=None,
      help="JSON groups of confusable images: each image's group members (text side) and their captions "
           "(image side) are always among its negatives")
    a("--fix_image_side_masks", action="store_true",
      help="image-side hard batches without IAIS get the masks of their padded layout (the original's let "
           "shorter captions attend to [PAD] and lose the image's last regions)")
    a("--resume", action="store_true", help="continue from the last training state in output_dir")
    a("--resume_with_changes", action="store_true",
      help="with --resume: continue although settings that change what is trained (engine/run_settings.py) "
           "differ from the run's log/hps.json; each change is logged, appended to log/hps_history.jsonl "
           "and written to hps.json")
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
    if opts.resume_with_changes and not opts.resume:
        raise ConfigError("--resume_with_changes accepts changed settings of a resumed run; add --resume")
    opts.best_metric = resolve_metric(opts.best_metric, opts.full_val)


def run_objectives(iais, alignment):
    """The run's alignment objectives: ``--IAIS`` (its IAIS objective) and ``--alignment``."""
    try:
        return build_objectives(([f"iais-{iais}"] if iais else []) + list(alignment))
    except ValueError as e:
        raise ConfigError(f"--IAIS/--alignment: {e}") from None


def build_model(opts, objectives, device):
    """The model; a resumed run's weights come from its own last checkpoint (loaded by
    engine.checkpointing.resume), so --checkpoint is not read then."""
    if opts.resume:
        LOGGER.info("--resume: the weights come from the last checkpoint in %s", join(opts.output_dir, "ckpt"))
    model, _ = load_model(UniterForImageTextRetrievalHardNeg, opts.model_config, opts.checkpoint,
                          opts.allow_random_init, resuming=opts.resume, img_dim=IMG_DIM, margin=opts.margin,
                          hard_size=opts.hard_neg_size, objectives=objectives)
    model.init_output()  # the ranking head starts from the pre-trained ITM head
    set_dropout(model, opts.dropout)
    return model.to(device)


def build_datasets(opts, objectives):
    img_dbs = ImageLmdbGroup(opts.conf_th, opts.max_bb, opts.min_bb, opts.num_bb, opts.compressed_db)
    iais = any(o.needs_position_masks for o in objectives)  # the padded layout with word and box masks
    groups = read_image_groups(opts.negative_groups) if opts.negative_groups else None
    text_side, image_side = [], []
    shard = {"rank": dist.get_rank(), "world_size": dist.get_world_size()}
    evaluation = {**shard, "setting": "inf_minibatch_size"}
    for txt_path, img_path in zip(opts.train_txt_dbs, opts.train_img_dbs):
        txt_db, img_db = TxtTokLmdb(txt_path, opts.max_txt_len), img_dbs[img_path]
        text_side.append(ItmRankDatasetHardNegFromText(txt_db, img_db, opts.negative_size, iais, groups, **shard))
        image_side.append(ItmRankDatasetHardNegFromImage(txt_db, img_db, opts.negative_size, iais, groups,
                                                         padded_masks=opts.fix_image_side_masks, **shard))
    if groups and not any(d.image_groups for d in text_side):
        raise DataError(f"negative_groups {opts.negative_groups}: none of its images is in the training data; "
                        f"check that it names images as the txt_db does (img_fname)")
    val_txt = TxtTokLmdb(opts.val_txt_db, -1)
    val_img = img_dbs[opts.val_img_db]
    return {"text": ConcatDataset(text_side), "image": ConcatDataset(image_side),
            "val": ItmValDataset(val_txt, val_img, opts.inf_minibatch_size, **evaluation),
            "val_full": ItmEvalDataset(val_txt, val_img, opts.inf_minibatch_size, **evaluation),
            "test": ItmEvalDataset(TxtTokLmdb(opts.test_txt_db, -1), img_dbs[opts.test_img_db],
                                   opts.inf_minibatch_size, **evaluation)}


def check_splits(dsets, uniter_config):
    for dset in dsets["text"].datasets + [dsets["val"], dsets["test"]]:
        check_split(dset.txt_db, dset.img_db, uniter_config, IMG_DIM)
        dset.txt_db.check_vocab(uniter_config.vocab_size)


def training_streams(dsets, seed, n_workers, pin_mem, worker_type, device):
    """{side: endless stream of hard-negative batches}; each rank and side shuffles and
    draws negatives from its own seed."""
    stream_seed = 2 * (seed * 1000 + dist.get_rank())
    return {side: ResumableStream(dsets[side], itm_rank_hn_collate, stream_seed + k, n_workers, pin_mem, device,
                                  worker_type)
            for k, side in enumerate(("text", "image"))}


def build_train_step(opts, state, objectives, device, amp_dtype):
    lr_at = partial(get_lr_sched, learning_rate=opts.learning_rate, warmup_steps=opts.warmup_steps,
                    num_train_steps=opts.num_train_steps)
    return TrainStep(state, positives=opts.train_batch_size, objectives=objectives,
                     num_train_steps=opts.num_train_steps, lr_at=lr_at, grad_norm=opts.grad_norm,
                     max_skipped_steps=opts.max_skipped_steps, device=device, amp_dtype=amp_dtype)


def log_start(opts, model, dsets, objectives):
    LOGGER.info("data loader: %s", f"{opts.n_workers} worker {opts.worker_type}(s) per stream"
                if opts.n_workers > 0 else "batches built in the training loop")
    LOGGER.info("training %d parameters on %d positives per side, %d steps, alignment: %s",
                sum(p.numel() for p in model.parameters()), sum(dist.all_gather_object(len(dsets["text"]))),
                opts.num_train_steps, ", ".join(o.name for o in objectives) or "off")


def main(opts):
    check_options(opts)
    started = now()
    device = dist.init(opts.collective_timeout)
    setup_logging(dist.is_main_process())
    launch = launch_record(device, started)
    opts.resume = decided_by_rank0(lambda: should_resume(opts.output_dir, opts.resume))
    hps = run_record(vars(opts), dist.get_world_size())
    # a resumed run is the same run: changed settings are refused before any work, unless accepted
    changes = decided_by_rank0(lambda: check_resume(join(opts.output_dir, "log"), hps, opts.model_config,
                                                    opts.resume_with_changes)) if opts.resume else []
    amp_dtype, use_scaler = resolve_amp(opts.fp16, opts.amp_dtype, device)
    LOGGER.info("device %s, %d process(es) via %s, mixed precision: %s%s", device, dist.get_world_size(),
                dist.backend_name(), amp_dtype or "off", " with loss scaling" if use_scaler else "")
    set_random_seed(opts.seed)

    # data and weights are checked before anything is written to output_dir
    objectives = run_objectives(opts.IAIS, opts.alignment)
    dsets = build_datasets(opts, objectives)
    model = build_model(opts, objectives, device)
    check_splits(dsets, model.config)
    resuming = opts.resume
    opts.resume = decided_by_rank0(lambda: claim(opts.output_dir, opts.resume))
    if resuming and not opts.resume:  # the weights were not loaded from --checkpoint
        raise ConfigError(f"output_dir {opts.output_dir}: its training state went away while starting; run again")
    folders = make_run_folders(opts.output_dir, opts.resume, hps, opts.model_config)
    if dist.is_main_process():
        record_launch(folders.log, launch, opts.resume)
    tb = TensorBoardLogger(folders.log if dist.is_main_process() else None)

    dist.broadcast_parameters(model)
    optimizer = build_optimizer(model, opts.optim, opts.learning_rate, opts.betas, opts.weight_decay)
    loading = (opts.n_workers, opts.pin_mem, opts.worker_type, device)
    state = TrainingState(model, optimizer, make_scaler(device, use_scaler),
                          training_streams(dsets, opts.seed, *loading))
    val_loader = prefetch_loader(dsets["val_full" if opts.full_val else "val"], itm_eval_collate, *loading)
    test_loader = prefetch_loader(dsets["test"], itm_eval_collate, *loading)
    start_step = resume(state, folders.ckpt, opts.model_config) if opts.resume else 0
    if opts.resume and dist.is_main_process():  # recorded once the training state is known to fit
        record_changes(folders.log, start_step, changes, hps, opts.model_config)
    best = BestCheckpoint(folders.ckpt, opts.best_metric)
    if opts.resume:
        best.load()
    log_start(opts, model, dsets, objectives)

    def validate_at(step):
        with autocast(device, amp_dtype):
            return validation_scalars(model, val_loader, step, opts.full_val, opts.original_counting)

    train_step = build_train_step(opts, state, objectives, device, amp_dtype)
    last_step = train_or_stop(train_step, folders, tb, start_step, opts, validate_at, best)
    test_log, _ = test_last_and_best(model, test_loader, last_step, best, folders, tb, opts.original_counting,
                                     partial(autocast, device, amp_dtype))
    end_run(folders, tb)
    return test_log


def train_or_stop(train_step, folders, tb, start_step, opts, validate_at, best):
    """train(); a run a signal stopped ends here, with its exit status, after its one line."""
    try:
        return train(train_step, folders.ckpt, start_step=start_step, num_train_steps=opts.num_train_steps,
                     valid_steps=opts.valid_steps, save_steps=opts.save_steps, validate=validate_at, tb=tb, best=best)
    except Interrupted as stopped:
        report_interrupted(stopped, sys.argv)  # first: under a launcher, the ranks that leave first end the rest
        end_run(folders, tb)
        sys.exit(stopped.exit_status)


def end_run(folders, tb):
    tb.close()
    draw_curves_at_end(folders)
    dist.shutdown()


if __name__ == "__main__":
    run(main, build_parser(), CONFIG_ONLY_KEYS)
