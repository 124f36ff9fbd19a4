"""Image-text retrieval evaluation: score matrices, R@1/5/10 and the quick validation."""
from time import time

import torch
from tqdm import tqdm

from model import scoring_mode
from utils.distributed import all_gather_object, all_gather_rows, is_main_process
from utils.logger import LOGGER
from utils.retrieval_metrics import KS, RECALL_KEYS, counting_name, gt_image_index, retrieval_metrics, text_query_ranks


@torch.no_grad()
def itm_eval(score_matrix, txt_ids, img_ids, txt2img, img2txts=None, original_counting=False):
    """R@1/5/10 of a [texts x images] score matrix and their means (fractions).

    img_r*: a text query finds its image; txt_r*: an image query finds any of its texts
    (those ``txt2img`` assigns to it; ``img2txts``, its inverse, is not needed: the
    original's call that passes it keeps working). Textbook recall unless ``original_counting``, which
    counts image retrieval as the original code does (see utils/retrieval_metrics.py).
    """
    gt_img = gt_image_index(txt_ids, img_ids, txt2img)
    metrics = retrieval_metrics(score_matrix.cpu(), gt_img, original_counting)
    log = {key: metrics[key] for key in RECALL_KEYS}
    for name in ("txt", "img"):
        log[f"{name}_r_mean"] = (log[f"{name}_r1"] + log[f"{name}_r5"] + log[f"{name}_r10"]) / 3
    log["r_mean"] = (log["txt_r_mean"] + log["img_r_mean"]) / 2
    return {k: log[k] for k in ("txt_r1", "txt_r5", "txt_r10", "txt_r_mean",
                                "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean")}


def inference(model, eval_loader):
    """Scores of this process's texts against every image: [n_txt, n_img] float32."""
    dset = eval_loader.dataset
    scores = torch.zeros(len(dset), len(dset.all_img_ids))
    with scoring_mode(model):
        for i, mini_batches in enumerate(tqdm(eval_loader, desc="evaluation", disable=not is_main_process())):
            j = 0
            for batch in mini_batches:
                s = model(batch, compute_loss=False)[0].squeeze(1).float().cpu()
                scores[i, j:j + s.numel()] = s
                j += s.numel()
            assert j == scores.size(1)
    return scores


@torch.no_grad()
def gather_scores(model, eval_loader):
    """(score matrix, text ids, image ids) over all processes. Rows follow the split's own
    text order whatever the number of processes, so results do not depend on it."""
    scores = inference(model, eval_loader)
    dset = eval_loader.dataset
    all_scores = all_gather_rows(scores)
    txt_ids = [i for ids in all_gather_object(dset.ids) for i in ids]
    assert all_scores.shape == (len(txt_ids), len(dset.all_img_ids))
    position = {t: k for k, t in enumerate(dset.txt_db.id2len)}
    order = sorted(range(len(txt_ids)), key=lambda r: position[txt_ids[r]])
    return all_scores[order], [txt_ids[r] for r in order], list(dset.all_img_ids)


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
    """Quick validation: recall@1/5/10 of each text's image among ``inf_minibatch_size``."""
    st = time()
    hits = torch.zeros(3)
    n = 0
    with scoring_mode(model):
        for batch in tqdm(val_loader, desc="validation", disable=not is_main_process()):
            scores = model(batch, compute_loss=False)[0].float().cpu().t()  # [1, candidates], the true image first
            rank = int(text_query_ranks(scores, torch.zeros(1, dtype=torch.long)))
            hits += torch.tensor([rank <= k for k in KS], dtype=torch.float)
            n += 1
    totals = all_gather_object((n, hits.tolist()))
    n = sum(t[0] for t in totals)
    hits = [sum(t[1][k] for t in totals) / max(n, 1) for k in range(3)]
    log = {"valid/ex_per_s": n / (time() - st), "valid/recall_1": hits[0],
           "valid/recall_5": hits[1], "valid/recall_10": hits[2]}
    LOGGER.info("validation: recall_1 %.2f, recall_5 %.2f, recall_10 %.2f",
                hits[0] * 100, hits[1] * 100, hits[2] * 100)
    return log


def format_recall_table(log, original_counting=False):
    """The R@K dict as a small text table (percentages) naming its counting."""
    rows = [("image retrieval", "img"), ("text retrieval", "txt")]
    lines = [f"{'':<16} {'R@1':>7} {'R@5':>7} {'R@10':>7}"]
    for title, key in rows:
        lines.append(f"{title:<16} " + " ".join(f"{log[f'{key}_r{r}'] * 100:7.2f}" for r in (1, 5, 10)))
    lines.append(f"{'R mean':<16} {log['r_mean'] * 100:7.2f}")
    lines.append(f"({counting_name(original_counting)} recall counting)")
    return "\n".join(lines)


def validation_scalars(model, loader, step, full, original_counting=False):
    """TensorBoard scalars of the validation pass at ``step``: the full R@K table (``full``:
    ``loader`` holds an ItmEvalDataset) or the quick recall (an ItmValDataset)."""
    if not full:
        return validate(model, loader)
    log = evaluate(model, loader, original_counting=original_counting)
    LOGGER.info("step %d validation:\n%s", step, format_recall_table(log, original_counting))
    return {f"valid/{k}": v for k, v in log.items()}
