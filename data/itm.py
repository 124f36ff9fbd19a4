"""Image-text matching datasets: hard-negative training groups, quick validation and
full evaluation. Each item is already a batch (DataLoader batch_size=1)."""
import logging
import threading
from collections import Counter

import torch
from torch.utils.data import get_worker_info

from utils.row_lengths import RowLengths

from .batch import compact_batch, iais_batch, padded_layout_masks, shared_across_batches
from .captions import CaptionDataset
from .errors import DataError
from .negatives import negatives_with

LOGGER = logging.getLogger("iais")


class _HardNegDataset(CaptionDataset):
    """A positive pair and ``neg_sample_size`` negatives per item; ``IAIS`` (truthy) gives
    the padded layout (``layout`` 'padded', else 'compact') with the position masks the
    alignment objectives need. ``image_groups``
    ({image: confusable images}, see data.groups) puts an image's group members (text
    side) or their captions (image side) among its negatives, before the random ones.
    ``rank``/``world_size``: this process's share of the captions (see CaptionDataset)."""

    def __init__(self, txt_db, img_db, neg_sample_size=1, IAIS=False, image_groups=None, *,
                 rank=0, world_size=1):
        if neg_sample_size <= 0:
            raise ValueError("neg_sample_size must be at least 1")
        super().__init__(txt_db, img_db, rank=rank, world_size=world_size)
        self.neg_sample_size = neg_sample_size
        self.layout = "padded" if IAIS else "compact"  # IAIS: the original's name for the padded layout
        self.image_groups = {img: [m for m in members if m in self.img2txts]
                             for img, members in (image_groups or {}).items() if img in self.img2txts}

    def _check_pool(self, n_candidates, what):
        """Refuse a split that has fewer than ``neg_sample_size`` negatives to draw from."""
        if n_candidates < self.neg_sample_size:
            largest = (n_candidates + 1) // 8 * 8 - 1
            advice = (f"lower --negative_size to {largest} or less" if largest >= 7 else
                      "this split is too small to train with hard negatives (at least 7 are needed)")
            raise DataError(f"{self.txt_db.db_dir}: {what}, fewer than negative_size {self.neg_sample_size} "
                            f"negatives; {advice}")


class ItmRankDatasetHardNegFromText(_HardNegDataset):
    """One caption against its image and ``neg_sample_size`` random other images."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.img_name_list = list(self.img2txts)
        self._check_pool(len(self.img_name_list) - 1,
                         f"{len(self.img_name_list)} images leave {len(self.img_name_list) - 1} other images")

    def __getitem__(self, i):
        txt_id = self.ids[i]
        gt_img = self.txt2img[txt_id]
        input_ids = self._caption(txt_id).unsqueeze(0)
        tl = input_ids.size(1)
        position_ids = torch.arange(tl, dtype=torch.long).unsqueeze(0)
        forced = self.image_groups.get(gt_img, [])
        img_ids = [gt_img] + negatives_with(forced, self.img_name_list, [gt_img], self.neg_sample_size)
        img_feat, img_pos_feat, num_bbs = self.image_features(img_ids)
        txt_lens = [tl] * len(img_ids)
        if self.layout == "padded":
            return iais_batch(input_ids, position_ids, img_feat, img_pos_feat, txt_lens, num_bbs, False)
        return compact_batch(input_ids, position_ids, img_feat, img_pos_feat, txt_lens, num_bbs, tl)


class ItmRankDatasetHardNegFromImage(_HardNegDataset):
    """One image against its caption and ``neg_sample_size`` captions of other images.

    Without IAIS the batch is, as in the original, laid out for a compact gather whose
    boxes start after the *last* caption, while the model trains it in the padded layout:
    a caption shorter than the longest attends to [PAD] tokens and loses as many of the
    image's last regions. ``padded_masks`` builds the masks of the padded layout instead
    (every row sees its whole caption and every region; scores equal the pair's alone)."""

    def __init__(self, *args, padded_masks=False, **kwargs):
        super().__init__(*args, **kwargs)
        # negative captions are drawn among this process's own, as the original draws them
        self.txt_name_list = list(self.ids)
        most = max(Counter(self.txt2img[t] for t in self.ids).values())
        self._check_pool(len(self.txt_name_list) - most,
                         f"{len(self.txt_name_list)} captions (on this process) minus the {most} of the image "
                         f"with most captions leave {len(self.txt_name_list) - most}")
        self.padded_masks = padded_masks

    def __getitem__(self, i):
        txt_id = self.ids[i]
        gt_img = self.txt2img[txt_id]
        feat, pos, nbb = self._get_img_feat(gt_img)
        forced = [t for img in self.image_groups.get(gt_img, ()) for t in self.img2txts[img]]
        txt_ids = [txt_id] + negatives_with(forced, self.txt_name_list, self.img2txts[gt_img], self.neg_sample_size)
        texts = [self._caption(t) for t in txt_ids]
        txt_lens = [len(t) for t in texts]
        input_ids = torch.nn.utils.rnn.pad_sequence(texts, batch_first=True, padding_value=0)
        position_ids = torch.arange(input_ids.size(1), dtype=torch.long).unsqueeze(0)
        num_bbs = [nbb] * len(txt_ids)
        args = (input_ids, position_ids, feat.unsqueeze(0), pos.unsqueeze(0), txt_lens, num_bbs)
        if self.layout == "padded":
            return iais_batch(*args, all_rows=False)
        if self.padded_masks:
            attn_masks, _, _ = padded_layout_masks(txt_lens, num_bbs)
            return {"input_ids": input_ids, "position_ids": position_ids, "img_feat": args[2],
                    "img_pos_feat": args[3], "attn_masks": attn_masks,
                    "lengths": RowLengths.of_layout(txt_lens, num_bbs, padded=True)}
        # boxes start after the *last* caption in the original's gather index (see get_gather_index)
        return compact_batch(*args, box_start=txt_lens[-1])


_said = set()  # the reductions of a mini-batch already logged (one line per split and setting)


def fitted_mini_batch(requested, n_images, db_dir, setting):
    """The image mini-batch size used for a split of ``n_images``: ``requested``, or the
    split's image count where it is larger (said once at INFO, naming ``setting``)."""
    if requested <= 0:
        raise DataError(f"image mini-batch size {requested} ({setting}) must be at least 1")
    if requested <= n_images:
        return requested
    if (db_dir, setting, requested) not in _said:
        _said.add((db_dir, setting, requested))
        LOGGER.info("%s %d is more than the %d images of %s: using %d", setting, requested, n_images, db_dir,
                    n_images)
    return n_images


class ItmValDataset(CaptionDataset):
    """Quick validation: each caption against its image and the next
    ``mini_batch_size - 1`` images of the split (wrapping around). A mini-batch larger
    than the split is reduced to its image count; ``setting`` names the option it came
    from in the line that says so."""

    def __init__(self, txt_db, img_db, mini_batch_size=400, IAIS=False, *, rank=0, world_size=1,
                 setting="image mini-batch size"):
        super().__init__(txt_db, img_db, rank=rank, world_size=world_size)
        self.all_img_ids = list(self.img2txts)
        self.layout = "padded" if IAIS else "compact"  # IAIS: the original's name for the padded layout
        self.bs = fitted_mini_batch(mini_batch_size, len(self.all_img_ids), txt_db.db_dir, setting)
        self._img_pos = {img: j for j, img in enumerate(self.all_img_ids)}

    def _get_batch_ids(self, i):
        gt_img = self.txt2img[self.ids[i]]
        j = self._img_pos[gt_img]
        n = len(self.all_img_ids)
        return gt_img, [self.all_img_ids[(j + k) % n] for k in range(1, self.bs)]

    def __getitem__(self, i):
        gt_img, neg_imgs = self._get_batch_ids(i)
        return self.get_batch(i, [gt_img] + neg_imgs)

    def get_batch(self, i, img_ids, image_side=None):
        """Caption i against ``img_ids`` (whose ``image_features`` may be given as ``image_side``)."""
        input_ids = self._caption(self.ids[i])
        tl = input_ids.size(0)
        input_ids = input_ids.unsqueeze(0).expand(len(img_ids), -1).clone()
        position_ids = torch.arange(tl, dtype=torch.long).unsqueeze(0)
        img_feat, img_pos_feat, num_bbs = image_side or self.image_features(img_ids)
        txt_lens = [tl] * len(img_ids)
        if self.layout == "padded":
            return iais_batch(input_ids, position_ids, img_feat, img_pos_feat, txt_lens, num_bbs, True)
        return compact_batch(input_ids, position_ids, img_feat, img_pos_feat, txt_lens, num_bbs, tl)


class _ImageSides:
    """The image side of each evaluation mini-batch, built once per process: it is the same
    for every caption. Not kept in worker processes, which hand every batch over by copy."""

    def __init__(self):
        self._built, self._lock = {}, threading.Lock()

    def get(self, key, build):
        if get_worker_info() is not None:
            return build()
        with self._lock:
            if key not in self._built:
                img_feat, img_pos_feat, num_bbs = build()
                self._built[key] = (shared_across_batches(img_feat), shared_across_batches(img_pos_feat), num_bbs)
            return self._built[key]

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


class ItmEvalDataset(ItmValDataset):
    """Full evaluation: each caption against every image of the split, images sorted by
    box count and cut into mini-batches of ``mini_batch_size``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.all_img_ids = sorted(self.all_img_ids, key=lambda i: self.img_db.name2nbb[i])
        self._image_sides = _ImageSides()

    def __getitem__(self, i):
        batches = []
        for st in range(0, len(self.all_img_ids), self.bs):
            img_ids = self.all_img_ids[st:st + self.bs]
            # not in recycled memory: these stay as long as the dataset
            image_side = self._image_sides.get(st, lambda: self.image_features(img_ids, recycle=False))
            batches.append(self.get_batch(i, img_ids, image_side))
        return batches


def itm_collate(inputs):
    """The batch that the one item of ``inputs`` already is: ITM datasets yield whole batches."""
    assert len(inputs) == 1, "ITM datasets yield whole batches; use batch_size=1"
    return inputs[0]


# the original's names, one per dataset kind
itm_rank_hn_collate = itm_val_collate = itm_eval_collate = itm_collate
