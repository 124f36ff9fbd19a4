"""Evaluate an image-text retrieval checkpoint: every text against every image, R@1/5/10.

    horovodrun -np 8 python inf_itm.py --txt_db /txt/itm_flickr30k_test.db --img_db /img/flickr30k/ \\
        --checkpoint /storage/itm/flickr/hard_neg/ckpt/model_step_5000.pt \\
        --model_config config/uniter-base.json --output_dir /storage/eval --fp16
    torchrun --nproc_per_node 2 inf_itm.py ...   |   python inf_itm.py ...

Writes output_dir/scores.json (R@K, textbook unless --original_counting 1, which counting, and
what was scored: n_texts, n_images and unmatched_images, the images without a text, which are
candidates but no query),
output_dir/score_matrix.pt ({'scores': [texts x images] float32, 'txt_ids', 'img_ids',
'txt2img': {text id: image id}}; torch.load(..., weights_only=True) reads it; input of
scripts/retrieval_metrics.py), output_dir/config.json and, with --dump_topk K,
output_dir/topk.jsonl (each query's K best candidates and the rank of its true match). A
checkpoint without ``rank_output`` (a pre-trained UNITER) is evaluated zero-shot from its ITM head.

The scores are written as they complete, --shard_texts captions a file, to output_dir/shards/
(engine/eval_shards.py), removed once score_matrix.pt is written: an evaluation stopped on the
way continues with --resume (the same settings), scoring only the captions no shard holds.
"""
import utils.threads  # noqa: F401  (first: sets the OpenMP thread count before torch loads OpenMP)
import json
import os
from os.path import join

from data import WORKER_TYPES, ItmEvalDataset, TxtTokLmdb, itm_eval_collate, open_img_db, prefetch_loader
from engine.eval_shards import (MANIFEST, SHARDS, ShardedRows, finish_shards, manifest, prepare_shards,
                                refuse_unfinished, shard_dir, sharded_scores)
from engine.evaluation import gather_rows, itm_eval
from engine.output_dir import decided_by_rank0
from model import IMG_DIM, UniterForImageTextRetrieval
from utils import distributed as dist
from utils.checkpoint import atomic_save
from engine.checks import check_head, check_scores_finite, check_split, load_model, refuse_earlier_results
from utils.cli import run
from utils.config import (NON_NEGATIVE, POSITIVE, ConfigError, add_box_args, add_counting_arg, make_parser,
                          take_settings)
from utils.logger import LOGGER, setup_logging
from utils.outputs import atomic_write, lock_dir, refuse_overwriting_inputs, refuse_unwritable, write_json
from utils.precision import autocast, resolve_amp
from utils.retrieval_metrics import (counting_name, format_recall_table, gt_image_index, scored_counts, topk_records,
                                     write_recall_log)

RESULTS = ("scores.json", "score_matrix.pt", "topk.jsonl")  # an earlier evaluation's, kept unless --overwrite
WRITTEN = ("config.json", join(SHARDS, MANIFEST)) + RESULTS
INPUTS = ("checkpoint", "model_config", "train_config", "txt_db", "img_db")


def build_parser():
    p = make_parser(__doc__.split("\n")[0])
    a = p.add_argument
    a("--txt_db", type=str, required=True, help="text DB of the split to evaluate")
    a("--img_db", type=str, required=True, help="image DB of the split")
    a("--checkpoint", type=str, required=True, help="model weights (.pt state dict)")
    a("--model_config", type=str, required=True, help="model config JSON (e.g. config/uniter-base.json)")
    a("--output_dir", type=str, required=True, help="where scores.json and score_matrix.pt go")
    a("--train_config", type=str, default=None, help="hps.json of training: take its box settings")
    add_box_args(p)
    a("--batch_size", type=int, default=400, valid=POSITIVE, help="images per forward pass")
    a("--fp16", action="store_true", help="mixed precision (float16 on GPU, bfloat16 on CPU)")
    a("--amp_dtype", choices=["fp16", "bf16"], default=None, help="mixed-precision dtype (fp16 is kept even on a CPU)")
    a("--n_workers", type=int, default=4, valid=NON_NEGATIVE, help="data loader workers (0: in the evaluation loop)")
    a("--worker_type", choices=WORKER_TYPES, default="thread", help="data loader workers are threads or processes")
    a("--pin_mem", action="store_true", help="pin host memory of batches")
    a("--IAIS", default=False, choices=["singular", "distributed", False],
      help="score in the padded layout IAIS training uses (same scores)")
    add_counting_arg(p)
    a("--dump_topk", type=int, default=0, valid=NON_NEGATIVE,
      help="write topk.jsonl: each query's K best candidates (0: off)")
    a("--collective_timeout", type=int, default=600, valid=POSITIVE, help="seconds before a collective gives up")
    a("--allow_random_init", action="store_true",
      help="evaluate even when the checkpoint leaves part of the model at random initialisation")
    a("--allow_nonfinite_scores", action="store_true", help="write the recall even when some scores are not finite")
    a("--overwrite", action="store_true",
      help="replace the results of an earlier evaluation in output_dir (or its unfinished shards)")
    a("--resume", action="store_true",
      help="continue an unfinished evaluation in output_dir from its shards (same settings)")
    a("--shard_texts", type=int, default=500, valid=POSITIVE,
      help="captions per shard file of output_dir/shards (500: about a minute of MS COCO 5K on one H100)")
    return p


def write_results(output_dir, settings, scores, txt_ids, img_ids, txt2img, original_counting, dump_topk):
    """config.json (``settings``), score_matrix.pt (with each text's image, so that
    scripts/retrieval_metrics.py needs nothing else), scores.json, topk.jsonl if asked;
    prints the R@K table."""
    txt2img = {t: txt2img[t] for t in txt_ids}
    log = itm_eval(scores, txt_ids, img_ids, txt2img, original_counting=bool(original_counting))
    gt_img = gt_image_index(txt_ids, img_ids, txt2img)
    scored = scored_counts(txt_ids, img_ids, gt_img)
    if scored["unmatched_images"]:
        LOGGER.warning("%d of the %d images have no scored text (first: %s): left out as image queries "
                       "(unmatched_images in scores.json)", len(scored["unmatched_images"]), len(img_ids),
                       ", ".join(scored["unmatched_images"][:3]))
    os.makedirs(output_dir, exist_ok=True)
    write_json(join(output_dir, "config.json"), settings, indent=2)
    atomic_save({"scores": scores, "txt_ids": txt_ids, "img_ids": img_ids, "txt2img": txt2img},
                join(output_dir, "score_matrix.pt"))
    write_recall_log(join(output_dir, "scores.json"), log, counting_name(original_counting), scored)
    if dump_topk:

        def write_topk(f):
            for record in topk_records(scores, txt_ids, img_ids, gt_img, dump_topk):
                f.write(json.dumps(record) + "\n")
        atomic_write(join(output_dir, "topk.jsonl"), write_topk, binary=False)
    print(format_recall_table(log, original_counting))


def check_output_dir(opts):
    """Before any work: output_dir can be made, none of the files written there is an
    input, and it holds no earlier evaluation (unless --overwrite)."""
    refuse_unwritable("--output_dir", opts.output_dir, folder=True)
    refuse_overwriting_inputs([("--output_dir", join(opts.output_dir, name), opts.output_dir) for name in WRITTEN],
                              [(f"--{key}", getattr(opts, key)) for key in INPUTS])
    refuse_earlier_results(opts.output_dir, RESULTS, opts.overwrite)
    refuse_unfinished(opts.output_dir, opts.resume, opts.overwrite)


def claim_output_dir(opts):
    """Make and lock output_dir for this run's life, then look for earlier results again
    (another run may have written there since the first look)."""
    os.makedirs(opts.output_dir, exist_ok=True)
    lock_dir(opts.output_dir, "--output_dir")
    refuse_earlier_results(opts.output_dir, RESULTS, opts.overwrite)


def score_matrix(opts, model, dataset, device, amp_dtype):
    """(this process's shards, the score matrix over all processes, text ids, image ids):
    the captions of complete shards read, the others scored a shard at a time."""
    shards = ShardedRows(shard_dir(opts.output_dir), dataset, dist.get_rank(), dist.get_world_size(),
                         opts.shard_texts)
    os.makedirs(shards.folder, exist_ok=True)  # on each node, where output_dir is not shared

    def open_loader(indices):
        return prefetch_loader(dataset, itm_eval_collate, opts.n_workers, opts.pin_mem, opts.worker_type, device,
                               keys=indices)
    with autocast(device, amp_dtype):
        rows = sharded_scores(model, shards, open_loader, dist.is_main_process())
    return (shards,) + gather_rows(rows, dataset)


def main(opts):
    for key in ("txt_db", "img_db", "checkpoint", "model_config", "output_dir"):
        if not getattr(opts, key):
            raise ConfigError(f"--{key} is required")
    check_output_dir(opts)
    device = dist.init(opts.collective_timeout)
    setup_logging(dist.is_main_process())
    decided_by_rank0(lambda: claim_output_dir(opts))
    if opts.train_config is not None:
        take_settings(build_parser(), opts, opts.train_config, ("conf_th", "max_bb", "min_bb", "num_bb"))
    amp_dtype, _ = resolve_amp(opts.fp16, opts.amp_dtype, device)
    decided_by_rank0(lambda: prepare_shards(opts.output_dir, manifest(opts, dist.get_world_size(), device, amp_dtype),
                                            opts.resume, opts.overwrite))

    img_db = open_img_db(opts.img_db, opts.conf_th, opts.max_bb, opts.min_bb, opts.num_bb,
                         opts.compressed_db)
    txt_db = TxtTokLmdb(opts.txt_db, -1)
    model, state = load_model(UniterForImageTextRetrieval, opts.model_config, opts.checkpoint,
                              opts.allow_random_init, img_dim=IMG_DIM, pairs_num=1)
    check_split(txt_db, img_db, model.config, IMG_DIM)
    txt_db.check_vocab(model.config.vocab_size)
    dataset = ItmEvalDataset(txt_db, img_db, opts.batch_size, IAIS=opts.IAIS, rank=dist.get_rank(),
                             world_size=dist.get_world_size(), setting="--batch_size")
    if not any(k.endswith("rank_output.weight") for k in state):
        check_head(state, opts.checkpoint, opts.allow_random_init)
        LOGGER.warning("no rank_output in %s: zero-shot evaluation from the ITM head", opts.checkpoint)
        model.init_output()
    model.to(device).eval()

    shards, scores, txt_ids, img_ids = score_matrix(opts, model, dataset, device, amp_dtype)
    check_scores_finite(scores, txt_ids, img_ids, opts.allow_nonfinite_scores)
    if dist.is_main_process():
        write_results(opts.output_dir, vars(opts), scores, txt_ids, img_ids, txt_db.txt2img,
                      opts.original_counting, opts.dump_topk)
    finish_shards(shards)
    dist.shutdown()


if __name__ == "__main__":
    run(main, build_parser())
