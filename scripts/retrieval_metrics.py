"""Retrieval metrics of a score matrix written by inf_itm.py: R@K, median ranks, K-fold means,
bootstrap intervals, a paired comparison with another model and Winoground scores.

    python scripts/retrieval_metrics.py eval/iais/score_matrix.pt --folds 5 --bootstrap 1000 \\
        --compare eval/baseline/score_matrix.pt --output eval/iais/metrics.json
    python scripts/retrieval_metrics.py eval/winoground/score_matrix.pt --groups winoground_groups.json \\
        --output eval/winoground/metrics.json

Prints a table (percentages) and writes OUTPUT (fractions in [0, 1]): img_r1/5/10 (a text
query finds its image), txt_r1/5/10 (an image query finds any of its texts), rsum, the
median ranks img_medr/txt_medr; 'folds' (--folds N: the same keys averaged over N folds of
consecutive images in the split's order, each scored against its own texts: N=5 on the
MS COCO 5K test set is the 1K protocol); 'ci95' (--bootstrap B: 95% percentile interval
per recall key, resampling the queries); 'compare' (--compare OTHER.pt: per recall key this
minus other, its 95% interval and two-sided p-value, both models scored on the same
resampled queries; B = 1000 unless --bootstrap is given); 'winoground' (--groups: text,
image and group scores of Thrush et al. 2022 over a JSON list of
{caption_0, caption_1, image_0, image_1} text and image ids, and their number n).
"""
import sys  # the repository this file is in comes first, whatever the path names (another clone, none)
from os.path import dirname, realpath
sys.path.insert(0, dirname(dirname(realpath(__file__))))
import utils.threads  # noqa: E402,F401  (next: sets the OpenMP thread count before torch loads OpenMP)
import os
from os.path import abspath, dirname

import torch

from data import DataError
from utils.checkpoint import load_checkpoint
from utils.cli import run
from utils.config import ConfigError, Range, add_counting_arg, make_parser
from utils.logger import LOGGER, setup_logging
from utils.outputs import lock_output_file, refuse_overwriting_inputs, refuse_unwritable, write_json
from utils.retrieval_metrics import (KS, RECALL_KEYS, confidence_intervals, counting_name,
                                     fold_metrics, gt_image_index, metrics_from_ranks, paired_comparison,
                                     group_indices, query_hits, query_ranks, scored_counts, winoground_scores)

SCORE_FILE_KEYS = ("scores", "txt_ids", "img_ids", "txt2img")
COMPARE_BOOTSTRAP = 1000


def build_parser():
    p = make_parser(__doc__.split("\n")[0])
    a = p.add_argument
    a("scores", help="score_matrix.pt written by inf_itm.py")
    a("--output", required=True, help="JSON file for the metrics")
    a("--folds", type=int, default=0, help="also average over N folds of consecutive images (COCO 1K: 5)")
    a("--bootstrap", type=int, default=0, help="resamples for the 95%% intervals (0: none)")
    a("--seed", type=int, default=42, valid=Range(0, 2**32 - 1), help="seed of the resampling")
    a("--compare", default=None, help="score_matrix.pt of another model on the same split")
    a("--groups", default=None, help="JSON list of Winoground-style twin groups")
    add_counting_arg(p)
    return p


def load_score_file(path):
    """(scores [n_txt, n_img] float32, txt_ids, img_ids, gt_img [n_txt]) of a score file."""
    data = load_checkpoint(path, "score file")
    missing = [k for k in SCORE_FILE_KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}: give a score_matrix.pt written by inf_itm.py "
                        f"(older ones have no txt2img; evaluate again)")
    types = {"scores": torch.Tensor, "txt_ids": list, "img_ids": list, "txt2img": dict}
    wrong = [k for k, kind in types.items() if not isinstance(data[k], kind)]
    if wrong:
        raise DataError(f"{path}: {', '.join(wrong)} of the wrong type; give a score_matrix.pt written by inf_itm.py")
    txt_ids, img_ids = data["txt_ids"], data["img_ids"]
    if data["scores"].is_complex() or data["scores"].dtype == torch.bool:
        raise DataError(f"{path}: scores of dtype {data['scores'].dtype}, expected real numbers")
    if not txt_ids or not img_ids:
        raise DataError(f"{path} holds {len(txt_ids)} texts and {len(img_ids)} images: nothing to score; "
                        f"evaluate a split with captions and images")
    for kind, ids in (("text", txt_ids), ("image", img_ids)):
        bad = next((i for i in ids if not isinstance(i, str)), None)
        if bad is not None:
            raise DataError(f"{path}: a {kind} id is {type(bad).__name__} {str(bad)[:40]}, ids are strings; give a "
                            f"score_matrix.pt written by inf_itm.py")
    scores = data["scores"].float()
    if scores.shape != (len(txt_ids), len(img_ids)):
        raise DataError(f"{path}: scores are {tuple(scores.shape)} but the file names {len(txt_ids)} texts "
                        f"and {len(img_ids)} images")
    for kind, ids in (("text", txt_ids), ("image", img_ids)):
        if len(set(ids)) != len(ids):
            raise DataError(f"{path}: its {kind} ids repeat; evaluate again with inf_itm.py")
    # a text without an entry is named by gt_image_index
    bad = next((t for t in txt_ids if t in data["txt2img"] and not isinstance(data["txt2img"][t], str)), None)
    if bad is not None:
        raise DataError(f"{path}: txt2img gives text {bad!r} the image {str(data['txt2img'][bad])[:40]}, not "
                        f"an image id (a string); give a score_matrix.pt written by inf_itm.py")
    if not torch.isfinite(scores.sum(dtype=torch.float64)):  # one pass; float64 cannot overflow here
        n_bad = int((~torch.isfinite(scores)).sum())
        raise DataError(f"{path}: {n_bad} scores are NaN or infinite; the model's outputs are not usable "
                        f"(check the checkpoint, or evaluate without --fp16)")
    try:
        gt_img = gt_image_index(txt_ids, img_ids, data["txt2img"])
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    return scores, txt_ids, img_ids, gt_img


def positions_of(ids, in_ids):
    position = {id_: i for i, id_ in enumerate(in_ids)}
    return [position[id_] for id_ in ids]


def aligned_to(path, other_path, txt_ids, img_ids, gt_img):
    """The other file's scores with rows and columns in this file's order."""
    other, other_txt, other_img, other_gt = load_score_file(other_path)
    for kind, mine, theirs in (("text", txt_ids, other_txt), ("image", img_ids, other_img)):
        if set(mine) != set(theirs):
            n_diff = len(set(mine) ^ set(theirs))
            raise DataError(f"{other_path}: {n_diff} {kind} ids differ from those of {path}; "
                            f"compare score files of the same split")
    rows = torch.tensor(positions_of(txt_ids, other_txt))
    columns = torch.tensor(positions_of(img_ids, other_img))
    if not torch.equal(columns.argsort()[other_gt[rows]], gt_img):
        raise DataError(f"{other_path}: its texts belong to other images than in {path}; "
                        f"compare score files of the same split")
    if other_txt != txt_ids:
        other = other[rows]
    return other if other_img == img_ids else other[:, columns]


def check_options(opts):
    if not opts.output:
        raise ConfigError("--output is required (the JSON file for the metrics)")
    for flag in ("folds", "bootstrap"):
        if getattr(opts, flag) < 0:
            raise ConfigError(f"--{flag} must be 0 (off) or positive, got {getattr(opts, flag)}")


def claim_output(opts):
    """Before any work: OUTPUT can be written, is none of the inputs, and is this run's
    for its life (a second run writing it is refused)."""
    refuse_unwritable("--output", opts.output, folder=False)
    refuse_overwriting_inputs([("--output", opts.output, opts.output)],
                              [("the score file", opts.scores), ("--compare", opts.compare),
                               ("--groups", opts.groups)])
    os.makedirs(dirname(abspath(opts.output)), exist_ok=True)
    lock_output_file(opts.output, "--output")


def compute(opts):
    """The metrics dict that OUTPUT holds."""
    scores, txt_ids, img_ids, gt_img = load_score_file(opts.scores)
    if opts.folds > len(img_ids):
        raise ConfigError(f"--folds {opts.folds} is more than the {len(img_ids)} images of {opts.scores}")
    counting = bool(opts.original_counting)
    ranks = query_ranks(scores, gt_img)
    scored = scored_counts(txt_ids, img_ids, gt_img)
    if scored["unmatched_images"]:
        unmatched = scored["unmatched_images"]
        LOGGER.warning("%s: %d of its %d images have no text (first: %s): candidates of the text queries, left "
                       "out as image queries (unmatched_images in %s)", opts.scores, len(unmatched), len(img_ids),
                       ", ".join(unmatched[:3]), opts.output)
    result = {"counting": counting_name(counting), **scored, **metrics_from_ranks(*ranks, counting)}
    if opts.folds:
        n_matched = len(img_ids) - len(scored["unmatched_images"])
        if opts.folds > n_matched:
            raise ConfigError(f"--folds {opts.folds} is more than the {n_matched} images of {opts.scores} that "
                              f"have texts")
        result["folds"] = {"n": opts.folds, **fold_metrics(scores, gt_img, opts.folds, counting)}
    hits = query_hits(*ranks, counting)
    if opts.bootstrap:
        result["ci95"] = confidence_intervals(hits, opts.bootstrap, opts.seed)
    if opts.compare:
        other = aligned_to(opts.scores, opts.compare, txt_ids, img_ids, gt_img)
        other_hits = query_hits(*query_ranks(other, gt_img), counting)
        result["compare_file"] = opts.compare
        result["compare"] = paired_comparison(hits, other_hits, opts.bootstrap or COMPARE_BOOTSTRAP, opts.seed)
    if opts.groups:
        result["winoground"] = winoground_scores(scores, *group_indices(opts.groups, txt_ids, img_ids))
    return result


def _recall_rows(metrics, intervals=None):
    """Table lines of R@K (percentages) and median ranks, with 95% intervals if given."""
    lines = [f"{'':<18}" + "".join(f"{h:>13}" for h in ("R@1", "R@5", "R@10", "medr"))]
    for title, side in (("image retrieval", "img"), ("text retrieval", "txt")):
        keys = [f"{side}_r{k}" for k in KS]
        lines.append(f"{title:<18}" + "".join(f"{metrics[key] * 100:13.2f}" for key in keys)
                     + f"{metrics[f'{side}_medr']:13.4g}")
        if intervals:
            lines.append(f"{'  95% interval':<18}" + "".join(
                f"{f'{intervals[key][0] * 100:.1f}-{intervals[key][1] * 100:.1f}':>13}" for key in keys))
    lines.append(f"{'rsum':<18}{metrics['rsum'] * 100:13.2f}")
    return lines


def format_report(opts, result):
    unmatched = len(result["unmatched_images"])
    lines = [f"{opts.scores}: {result['n_texts']} texts, {result['n_images']} images"
             + (f" ({unmatched} without a text, no image query)" if unmatched else "")
             + f" ({result['counting']} recall counting)"]
    lines += _recall_rows(result, result.get("ci95"))
    if "folds" in result:
        lines += ["", f"mean over {result['folds']['n']} folds of consecutive images"]
        lines += _recall_rows(result["folds"])
    if "compare" in result:
        lines += ["", f"this minus {result['compare_file']} (95% interval, two-sided paired-bootstrap p)"]
        for key in RECALL_KEYS:
            c = result["compare"][key]
            lines.append(f"{key:<18}{c['diff'] * 100:+8.2f}  [{c['ci95'][0] * 100:+.2f}, "
                         f"{c['ci95'][1] * 100:+.2f}]  p = {c['p']:.4f}")
    if "winoground" in result:
        w = result["winoground"]
        lines += ["", f"Winoground ({w['n']} groups): text {w['text'] * 100:.2f}  image {w['image'] * 100:.2f}  "
                      f"group {w['group'] * 100:.2f}  (chance 25, 25, 16.67); own image above the "
                      f"other one: {w['own_vs_twin'] * 100:.2f} of the captions (chance 50)"]
    return "\n".join(lines)


def main(opts):
    setup_logging(True)
    check_options(opts)
    claim_output(opts)
    result = compute(opts)
    write_json(opts.output, result, indent=2)
    print(format_report(opts, result))


if __name__ == "__main__":
    run(main, build_parser())
