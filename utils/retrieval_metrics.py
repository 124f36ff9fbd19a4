"""Retrieval metrics of a [texts x images] score matrix: R@K, median rank, K-fold (COCO 1K)
means, bootstrap confidence intervals, paired comparison and Winoground scores.

Every recall in the project is counted here. Ranks are 1-based and ties count against
the query: a text's rank is 1 + the number of *other* images scoring at least as high
as its own image; an image's rank is 1 + the number of texts of other images scoring at
least as high as its best-scoring own text (a tie between two of its own texts costs
nothing). A non-finite score counts as higher than any other. Under the original counting
(``original_counting``), a text query also gets one extra hit at R@K when its row index is
below K and its image is in its top 10 (the original's ``nonzero()`` quirk); the paper's
numbers include it.
"""
import torch

from .config import ConfigError, load_json
from .outputs import write_json

KS = (1, 5, 10)
SIDES = ("img", "txt")  # img: a text query finds its image; txt: an image query finds any of its texts
RECALL_KEYS = tuple(f"{side}_r{k}" for side in SIDES for k in KS)
_ROWS_PER_CHUNK = 2048  # bounds the [rows x images] comparison masks to some 10 MB per 5,000 images


def recall_means(metrics):
    """The evaluation log of R@K ``metrics``: per direction each R@K and their mean
    (``{side}_r_mean``), then ``r_mean``, the mean of the two directions' means."""
    log = {}
    for side in ("txt", "img"):
        log.update({f"{side}_r{k}": metrics[f"{side}_r{k}"] for k in KS})
        log[f"{side}_r_mean"] = sum(metrics[f"{side}_r{k}"] for k in KS) / len(KS)
    log["r_mean"] = (log["txt_r_mean"] + log["img_r_mean"]) / 2
    return log


def write_recall_log(path, log, counting, scored=None):
    """A :func:`recall_means` log as the results JSON both entry points write (training's
    results_test/results_N.json, inf_itm.py's scores.json), with its ``counting`` named and
    what was scored (:func:`scored_counts`) when given."""
    write_json(path, {**log, "counting": counting, **(scored or {})}, indent=2)


def scored_counts(txt_ids, img_ids, gt_img):
    """What a score matrix scored: ``n_texts``, ``n_images`` (all candidates), and
    ``unmatched_images``, the images without a text, left out as queries."""
    return {"n_texts": len(txt_ids), "n_images": len(img_ids), "unmatched_images": unmatched_image_ids(gt_img, img_ids)}


def format_recall_table(log, original_counting=False):
    """A :func:`recall_means` log as a small text table (percentages) naming its counting."""
    lines = [f"{'':<16} " + " ".join(f"{f'R@{k}':>7}" for k in KS)]
    for title, side in (("image retrieval", "img"), ("text retrieval", "txt")):
        lines.append(f"{title:<16} " + " ".join(f"{log[f'{side}_r{k}'] * 100:7.2f}" for k in KS))
    lines.append(f"{'R mean':<16} {log['r_mean'] * 100:7.2f}")
    lines.append(f"({counting_name(original_counting)} recall counting)")
    return "\n".join(lines)


def counting_name(original_counting):
    return "original" if original_counting else "textbook"


def gt_image_index(txt_ids, img_ids, txt2img):
    """Column of each text's image: LongTensor [n_txt]. Raises ValueError naming the first
    text without an image among ``img_ids``."""
    column = {img: j for j, img in enumerate(img_ids)}
    index = []
    for txt in txt_ids:
        img = txt2img.get(txt)
        if img not in column:
            raise ValueError(f"text {txt!r} has no image among the image ids (txt2img gives {img!r})")
        index.append(column[img])
    return torch.tensor(index, dtype=torch.long)


def count_true(mask, dim):
    # a bool tensor's sum accumulates in int64, twice as slow as bytes summed in int32
    return mask.view(torch.uint8).sum(dim, dtype=torch.int32).long()


def text_query_ranks(scores, gt_img):
    """Rank of each text's image among all images: LongTensor [n_txt], 1-based.

    scores: [n_txt, n_img]; gt_img: [n_txt] column of each text's image."""
    ranks = torch.empty(scores.size(0), dtype=torch.long)
    for st in range(0, scores.size(0), _ROWS_PER_CHUNK):
        rows = scores[st:st + _ROWS_PER_CHUNK].float()
        own = rows.gather(1, gt_img[st:st + _ROWS_PER_CHUNK, None])
        # counting the strictly lower scores makes NaNs and ties land above the true image
        ranks[st:st + rows.size(0)] = scores.size(1) - count_true(rows < own, 1)
    return ranks


def image_query_ranks(scores, gt_img):
    """Rank of each image's first own text among all texts: LongTensor [n_img], 1-based;
    an image without texts gets n_txt + 1.

    scores: [n_txt, n_img]; gt_img: [n_txt] column of each text's image."""
    n_txt, n_img = scores.shape
    own = scores.float().gather(1, gt_img[:, None]).squeeze(1)                       # [n_txt]
    best = torch.full((n_img,), float("-inf")).scatter_reduce(0, gt_img, own, "amax")  # [n_img]
    n_own = torch.zeros(n_img, dtype=torch.long).scatter_add_(0, gt_img, torch.ones_like(gt_img))
    own_below = torch.zeros(n_img, dtype=torch.long).scatter_add_(0, gt_img, (own < best[gt_img]).long())
    all_below = torch.zeros(n_img, dtype=torch.long)
    for st in range(0, n_txt, _ROWS_PER_CHUNK):
        all_below += count_true(scores[st:st + _ROWS_PER_CHUNK].float() < best, 0)
    other_at_or_above = (n_txt - n_own) - (all_below - own_below)
    return 1 + other_at_or_above


def matched_images(img_ranks, n_txt):
    """Bool mask [n_img] of the images that have a text: the image queries. An image with
    texts ranks at most n_txt, one without them at n_txt + 1 (image_query_ranks)."""
    return img_ranks <= n_txt


def unmatched_image_ids(gt_img, img_ids):
    """The ids of the images no text belongs to (candidates for the text queries, but no
    image query: nothing could be found for them)."""
    has_text = torch.zeros(len(img_ids), dtype=torch.bool)
    has_text[gt_img] = True
    return [img_ids[j] for j in (~has_text).nonzero().squeeze(1).tolist()]


def query_hits(txt_ranks, img_ranks, original_counting=False):
    """Hits per query and recall key: {key: float tensor [n_queries]} (img_* over the text
    queries, txt_* over the image queries: the images that have a text); the mean of each
    is its recall."""
    n_txt, n_img = len(txt_ranks), len(img_ranks)
    # an image without texts would count as a query that always misses: it is none
    img_ranks = img_ranks[matched_images(img_ranks, n_txt)]
    hits = {f"txt_r{k}": (img_ranks <= min(k, n_txt)).double() for k in KS}
    for k in KS:
        hit = (txt_ranks <= k).double()
        if original_counting:
            hit += ((torch.arange(n_txt) < k) & (txt_ranks <= min(10, n_img))).double()
        hits[f"img_r{k}"] = hit
    return {key: hits[key] for key in RECALL_KEYS}


def query_ranks(scores, gt_img):
    """(text query ranks [n_txt], image query ranks [n_img])."""
    return text_query_ranks(scores, gt_img), image_query_ranks(scores, gt_img)


def metrics_from_ranks(txt_ranks, img_ranks, original_counting=False):
    """R@1/5/10 both ways (fractions), their sum ``rsum`` and the median ranks (the lower
    of the two middle ranks for an even count)."""
    if not len(txt_ranks):
        raise ValueError("no text to score: recall needs at least one text and its image")
    hits = query_hits(txt_ranks, img_ranks, original_counting)
    metrics = {key: float(hit.mean()) for key, hit in hits.items()}
    metrics["rsum"] = sum(metrics[key] for key in RECALL_KEYS)
    metrics["img_medr"] = int(txt_ranks.median())  # torch's median is the lower middle value
    metrics["txt_medr"] = int(img_ranks[matched_images(img_ranks, len(txt_ranks))].median())
    return metrics


def retrieval_metrics(scores, gt_img, original_counting=False):
    """metrics_from_ranks() of a [n_txt, n_img] score matrix."""
    return metrics_from_ranks(*query_ranks(scores, gt_img), original_counting)


def images_in_split_order(gt_img, n_img):
    """Image columns in the order of their first text: LongTensor [n_img]. The texts follow
    the split's own order, the columns do not (evaluation sorts images by box count)."""
    first_text = torch.full((n_img,), len(gt_img)).scatter_reduce(0, gt_img, torch.arange(len(gt_img)), "amin")
    return first_text.argsort(stable=True)


def fold_metrics(scores, gt_img, n_folds, original_counting=False):
    """Metrics averaged over ``n_folds`` folds of consecutive images in the split's order,
    each fold's images scored against their own texts only (the MS COCO 1K protocol on the
    5K test set). Folds are as equal as possible and made of the images that have texts
    (those without have no place in the split's order). Raises ValueError when there are
    fewer such images than folds."""
    order = images_in_split_order(gt_img, scores.size(1))
    n_matched = len(torch.unique(gt_img))
    if not 1 <= n_folds <= n_matched:
        raise ValueError(f"{n_folds} folds of {n_matched} images with texts: each fold needs at least one")
    per_fold = []
    for columns in order[:n_matched].tensor_split(n_folds):
        rows = torch.isin(gt_img, columns).nonzero().squeeze(1)
        local = torch.full((scores.size(1),), -1, dtype=torch.long)
        local[columns] = torch.arange(len(columns))
        per_fold.append(retrieval_metrics(scores[rows][:, columns], local[gt_img[rows]], original_counting))
    return {key: sum(m[key] for m in per_fold) / n_folds for key in per_fold[0]}


def _resample_counts(n, n_boot, generator):
    """How often each of n queries is drawn in each of n_boot resamples: [n_boot, n] float64."""
    draws = torch.randint(n, (n_boot, n), generator=generator)
    ones = torch.ones(n_boot, n, dtype=torch.float64)
    return torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(1, draws, ones)


def bootstrap_recalls(systems_hits, n_boot, seed, boot_chunk=100):
    """Recall of each system over ``n_boot`` resamples of the queries (with replacement),
    the same resamples for every system: {key: [n_systems, n_boot] float64}.

    systems_hits: a list of query_hits() dicts over the same queries."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for side in SIDES:
        keys = [f"{side}_r{k}" for k in KS]
        values = torch.stack([hits[key] for hits in systems_hits for key in keys], 1)  # [n, systems * 3]
        means = []
        for st in range(0, n_boot, boot_chunk):
            counts = _resample_counts(values.size(0), min(boot_chunk, n_boot - st), generator)
            means.append(counts @ values / values.size(0))
        means = torch.cat(means).t().reshape(len(systems_hits), len(keys), n_boot)
        for i, key in enumerate(keys):
            out[key] = means[:, i]
    return out


def percentile_interval(samples, level=0.95):
    tail = (1 - level) / 2
    lo, hi = torch.quantile(samples, torch.tensor([tail, 1 - tail], dtype=samples.dtype))
    return [float(lo), float(hi)]


def paired_p_value(diffs):
    """Two-sided paired-bootstrap p-value of a difference: twice the smaller share of
    resamples whose difference is <= 0 or >= 0, counting the observed sample as one of them
    (so it is never 0), at most 1."""
    below, above = int((diffs <= 0).sum()), int((diffs >= 0).sum())
    return min(1.0, 2 * (1 + min(below, above)) / (len(diffs) + 1))


def confidence_intervals(hits, n_boot, seed):
    """{recall key: [lo, hi]}: 95% percentile interval over bootstrap resamples of the queries."""
    boot = bootstrap_recalls([hits], n_boot, seed)
    return {key: percentile_interval(boot[key][0]) for key in RECALL_KEYS}


def paired_comparison(hits, other_hits, n_boot, seed):
    """{recall key: {diff, ci95, p}} of this system minus the other, both scored on the same
    resampled queries."""
    boot = bootstrap_recalls([hits, other_hits], n_boot, seed)
    result = {}
    for key in RECALL_KEYS:
        diffs = boot[key][0] - boot[key][1]
        result[key] = {"diff": float(hits[key].mean() - other_hits[key].mean()),
                       "ci95": percentile_interval(diffs), "p": paired_p_value(diffs)}
    return result


GROUP_KEYS = {"caption_0": "txt", "caption_1": "txt", "image_0": "img", "image_1": "img"}


def group_indices(groups_path, txt_ids, img_ids, ids_of="the score file",
                  advice="use the ids of the split it was evaluated on"):
    """(caption rows, image columns) of a Winoground-style groups file (a JSON list of
    {caption_0, caption_1, image_0, image_1}) in a score matrix: two LongTensors [n_groups, 2].
    An id that is not among ``txt_ids``/``img_ids`` is one line naming ``ids_of``, where
    they come from, and the ``advice``."""
    groups = load_json(groups_path, "groups file")
    if not isinstance(groups, list) or not groups:
        raise ConfigError(f"{groups_path}: expected a non-empty JSON list of "
                          f"{{caption_0, caption_1, image_0, image_1}} objects")
    position = {"txt": {t: i for i, t in enumerate(txt_ids)}, "img": {m: j for j, m in enumerate(img_ids)}}
    index = {key: [] for key in GROUP_KEYS}
    for n, group in enumerate(groups):
        for key, kind in GROUP_KEYS.items():
            if not isinstance(group, dict) or key not in group:
                raise ConfigError(f"{groups_path}: group {n} lacks {key!r}; each group needs caption_0, "
                                  f"caption_1 (text ids) and image_0, image_1 (image ids)")
            if not isinstance(group[key], str) or group[key] not in position[kind]:
                what = "a text" if kind == "txt" else "an image"
                raise ConfigError(f"{groups_path}: group {n}: {key} {group[key]!r} is not {what} id of "
                                  f"{ids_of}; {advice}")
            index[key].append(position[kind][group[key]])
        for a, b in (("caption_0", "caption_1"), ("image_0", "image_1")):
            if group[a] == group[b]:
                raise ConfigError(f"{groups_path}: group {n} has {group[a]!r} as both {a} and {b}; a twin group "
                                  f"pairs two different captions and two different images")
    captions = torch.tensor([index["caption_0"], index["caption_1"]]).t()
    images = torch.tensor([index["image_0"], index["image_1"]]).t()
    return captions, images


def winoground_outcomes(scores, caption_rows, image_columns):
    """Per twin group, as bool tensors [n_groups]: ``text`` (each image scores its own caption
    above the other caption), ``image`` (each caption scores its own image above the other
    image) and ``own_0``/``own_1`` (caption_0/caption_1 scores its own image above the other
    one). caption_rows, image_columns: LongTensor [n_groups, 2], rows of caption_0/caption_1
    and columns of image_0/image_1; caption k belongs with image k. Ties fail."""
    c0, c1 = caption_rows[:, 0], caption_rows[:, 1]
    i0, i1 = image_columns[:, 0], image_columns[:, 1]
    s00, s01, s10, s11 = scores[c0, i0], scores[c0, i1], scores[c1, i0], scores[c1, i1]
    own_0, own_1 = s00 > s01, s11 > s10
    return {"text": (s00 > s10) & (s11 > s01), "image": own_0 & own_1, "own_0": own_0, "own_1": own_1}


def winoground_summary(outcomes):
    """Text, image and group scores of Thrush et al. (CVPR 2022), and ``own_vs_twin``: the
    share of captions that score their own image above the other one (chance 1/2)."""
    text, image = outcomes["text"].double(), outcomes["image"].double()
    own = torch.cat([outcomes["own_0"], outcomes["own_1"]]).double()
    return {"text": float(text.mean()), "image": float(image.mean()), "group": float((text * image).mean()),
            "own_vs_twin": float(own.mean()), "n": len(text)}


def winoground_scores(scores, caption_rows, image_columns):
    """winoground_summary() of the twin groups of a score matrix."""
    return winoground_summary(winoground_outcomes(scores, caption_rows, image_columns))


def topk_records(scores, txt_ids, img_ids, gt_img, k):
    """Per-query results for error analysis, text queries first: dicts with the query's
    ``id``, its top-k candidate ids and scores, and the rank of its (first) true match."""
    k_img, k_txt = min(k, len(img_ids)), min(k, len(txt_ids))
    txt_ranks, img_ranks = query_ranks(scores, gt_img)
    top = scores.topk(k_img, dim=1)
    for r, txt in enumerate(txt_ids):
        yield {"query": "text", "id": txt, "target": img_ids[gt_img[r]], "rank": int(txt_ranks[r]),
               "topk_ids": [img_ids[j] for j in top.indices[r].tolist()], "topk_scores": top.values[r].tolist()}
    top = scores.topk(k_txt, dim=0)
    targets = [[] for _ in img_ids]
    for r, j in enumerate(gt_img.tolist()):
        targets[j].append(txt_ids[r])
    for j, img in enumerate(img_ids):
        yield {"query": "image", "id": img, "targets": targets[j], "rank": int(img_ranks[j]),
               "topk_ids": [txt_ids[r] for r in top.indices[:, j].tolist()],
               "topk_scores": top.values[:, j].tolist()}
