"""Image-text retrieval evaluation: score matrices, R@1/5/10 and the quick validation."""
from time import time

import torch
from tqdm import tqdm

from model import scoring_mode
from utils.distributed import all_gather_object, all_gather_rows, is_main_process
from utils.logger import LOGGER
from utils.retrieval_metrics import (KS, RECALL_KEYS, format_recall_table, gt_image_index, recall_means,
                                     retrieval_metrics, text_query_ranks)


@torch.no_grad()
def itm_eval(score_matrix, txt_ids, img_ids, txt2img, img2txts=None, original_counting=False):
    """R@K (utils/retrieval_metrics.py: KS) of a [texts x images] score matrix and their
    means (fractions), as :func:`utils.retrieval_metrics.recall_means` lays them out.

    img_r*: a text query finds its image; txt_r*: an image query finds any of its texts
    (those ``txt2img`` assigns to it; ``img2txts``, its inverse, is not needed: the
    original's call that passes it keeps working). Textbook recall unless ``original_counting``, which
    counts image retrieval as the original code does (see utils/retrieval_metrics.py).
    """
    gt_img = gt_image_index(txt_ids, img_ids, txt2img)
    return recall_means(retrieval_metrics(score_matrix.cpu(), gt_img, original_counting))


def scored_rows(model, eval_loader, n_img):
    """Each item's scores against every image, [n_img] float32, one caption at a time."""
    with scoring_mode(model):
        for mini_batches in eval_loader:
            row, j = torch.empty(n_img), 0
            for batch in mini_batches:
                s = model(batch, compute_loss=False)[0].squeeze(1).float().cpu()
                row[j:j + s.numel()] = s
                j += s.numel()
            assert j == n_img
            yield row


def inference(model, eval_loader):
    """Scores of this process's texts against every image: [n_txt, n_img] float32."""
    dset = eval_loader.dataset
    scores = torch.zeros(len(dset), len(dset.all_img_ids))
    rows = scored_rows(model, eval_loader, scores.size(1))
    for i, row in enumerate(tqdm(rows, desc="evaluation", total=len(dset), disable=not is_main_process())):
        scores[i] = row
    return scores


def gather_rows(scores, dset):
    """(score matrix, text ids, image ids) over all processes from each one's rows
    ``scores`` of its dataset ``dset``, in the split's own text order whatever the number
    of processes, so that results do not depend on it."""
    all_scores = all_gather_rows(scores)
    txt_ids = [i for ids in all_gather_object(dset.ids) for i in ids]
    assert all_scores.shape == (len(txt_ids), len(dset.all_img_ids))
    position = {t: k for k, t in enumerate(dset.txt_db.id2len)}
    order = sorted(range(len(txt_ids)), key=lambda r: position[txt_ids[r]])
    return all_scores[order], [txt_ids[r] for r in order], list(dset.all_img_ids)


@torch.no_grad()
def gather_scores(model, eval_loader):
    """(score matrix, text ids, image ids) over all processes (see :func:`gather_rows`)."""
    return gather_rows(inference(model, eval_loader), eval_loader.dataset)


@torch.no_grad()
def evaluate(model, eval_loader, original_counting=False):
    """Full R@K evaluation (every text against every image), the same on every rank."""
    st = time()
    scores, txt_ids, img_ids = gather_scores(model, eval_loader)
    dset = eval_loader.dataset
    log = itm_eval(scores, txt_ids, img_ids, dset.txt2img, original_counting=original_counting)
    LOGGER.info("evaluation finished in %d seconds", time() - st)
    return log


def validate(model, val_loader):
    """Quick validation: recall@K (KS) of each text's image among ``inf_minibatch_size``."""
    st = time()
    hits = torch.zeros(len(KS))
    n = 0
    with scoring_mode(model):
        for batch in tqdm(val_loader, desc="validation", disable=not is_main_process()):
            scores = model(batch, compute_loss=False)[0].float().cpu().t()  # [1, candidates], the true image first
            rank = int(text_query_ranks(scores, torch.zeros(1, dtype=torch.long)))
            hits += torch.tensor([rank <= k for k in KS], dtype=torch.float)
            n += 1
    totals = all_gather_object((n, hits.tolist()))
    n = sum(t[0] for t in totals)
    hits = [sum(t[1][j] for t in totals) / max(n, 1) for j in range(len(KS))]
    log = {"valid/ex_per_s": n / (time() - st), **{f"valid/recall_{k}": hit for k, hit in zip(KS, hits)},
           "valid/recall_mean": sum(hits) / len(hits)}
    LOGGER.info("validation: %s", ", ".join(f"recall_{k} {hit * 100:.2f}" for k, hit in zip(KS, hits)))
    return log


def validation_scalar_names(full):
    """The scalars :func:`validation_scalars` gives, in its order."""
    if full:
        return [f"valid/{k}" for k in recall_means({key: 0.0 for key in RECALL_KEYS})]
    return ["valid/ex_per_s"] + [f"valid/recall_{k}" for k in KS] + ["valid/recall_mean"]


def validation_scalars(model, loader, step, full, original_counting=False):
    """TensorBoard scalars of the validation pass at ``step``: the full R@K table (``full``:
    ``loader`` holds an ItmEvalDataset) or the quick recall (an ItmValDataset)."""
    if not full:
        return validate(model, loader)
    log = evaluate(model, loader, original_counting=original_counting)
    LOGGER.info("step %d validation:\n%s", step, format_recall_table(log, original_counting))
    return {f"valid/{k}": v for k, v in log.items()}
