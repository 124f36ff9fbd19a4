"""The caption dataset every ITM dataset builds on: this process's share of a split's
captions, checked against the image DB, with the features of their images."""
from collections import namedtuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .batch import RecycledBuffers, box_position_features, iais_batch
from .errors import DataError
from .feature_store import FeatureStore
from .txt_db import TxtTokLmdb

PairBatch = namedtuple("PairBatch", "txt_id batch n_words n_boxes")
PairBatch.__doc__ = """A caption with its own image: ``batch`` in the padded IAIS layout,
``n_words`` WordPiece tokens without [CLS]/[SEP], ``n_boxes`` regions of the image."""


class CaptionDataset(Dataset):
    """Captions of process ``rank`` of ``world_size`` (``ids``: the split's text ids
    ``[rank::world_size]``, as the original shards them), with their images' features.
    ``txt2img`` and ``img2txts`` cover the whole split."""

    def __init__(self, txt_db, img_db, *, rank=0, world_size=1):
        if not isinstance(txt_db, TxtTokLmdb) or not isinstance(img_db, FeatureStore):
            raise TypeError("expected a TxtTokLmdb and a FeatureStore (data.open_img_db opens one)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of the {world_size} processes (0 to world_size - 1)")
        self.txt_db, self.img_db = txt_db, img_db
        self._feat_buffers = RecycledBuffers()
        self.ids = list(txt_db.id2len)[rank::world_size]
        if not txt_db.id2len:
            raise DataError(f"{txt_db.db_dir}: no caption left after filtering by max_txt_len; "
                            f"raise --max_txt_len")
        self.txt2img = txt_db.txt2img
        # img2txts.json's images are all candidates (evaluation) and negatives (training)
        needed = {self.txt2img[i] for i in txt_db.id2len if i in self.txt2img} | set(txt_db.img2txts)
        if not needed <= set(img_db.name2nbb):
            describe = getattr(img_db, "missing_images", None)
            missing = sorted(needed - set(img_db.name2nbb))
            detail = (describe(needed) if describe else
                      f"{len(missing)} image(s) are not in {img_db.db_dir} (first: {', '.join(missing[:3])})")
            raise DataError(f"{txt_db.db_dir} names images that the img_db cannot give: {detail}; check that "
                            f"txt_db and img_db match")
        txt_db.check_links()
        self.img2txts = txt_db.img2txts

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.txt_db[self.ids[i]]

    def _caption(self, txt_id):
        """[CLS] + the caption's WordPiece ids + [SEP]: LongTensor [L]."""
        return self.txt_db.combine_inputs(self.txt_db[txt_id]["input_ids"])

    def _get_img_feat(self, fname):
        """(features [nbb, D] as stored, position features [nbb, 7] float32, nbb) of one image."""
        feat, norm_bb = self.img_db[fname]
        return feat, box_position_features(norm_bb), feat.size(0)

    def image_features(self, fnames, recycle=True):
        """Features of several images padded into one tensor:
        (img_feat [n, max_nbb, D] as stored, img_pos_feat [n, max_nbb, 7] float32, num_bbs).

        With ``recycle`` the features are written into memory of earlier batches that
        nothing refers to any more (see ``RecycledBuffers``); keep them past the next few
        batches only with ``recycle=False``."""
        arrays = [self.img_db.read_arrays(f) for f in fnames]
        num_bbs = [a["features"].shape[0] for a in arrays]
        n, max_nbb = len(fnames), max(num_bbs)
        shape, dtype = (n, max_nbb, arrays[0]["features"].shape[1]), arrays[0]["features"].dtype
        feat = self._feat_buffers.empty(shape, dtype) if recycle else np.empty(shape, dtype)
        bb = np.zeros((n, max_nbb, 6), dtype=np.float32)
        for i, (a, nbb) in enumerate(zip(arrays, num_bbs)):
            feat[i, :nbb] = a["features"]
            feat[i, nbb:] = 0
            bb[i, :nbb] = a["norm_bb"]
        return torch.from_numpy(feat), box_position_features(torch.from_numpy(bb)), num_bbs

    def pair_batch(self, i):
        """Caption i with its own image, a one-row batch in the padded IAIS layout with the
        position masks of all rows: input_ids and position_ids [1, L], img_feat [1, nbb, D]
        as stored, img_pos_feat [1, nbb, 7], attn_masks, txt_attn_masks and img_attn_masks
        [1, L + nbb]. Returns PairBatch(txt_id, batch, n_words=L - 2, n_boxes=nbb)."""
        txt_id = self.ids[i]
        input_ids = self._caption(txt_id).unsqueeze(0)
        tl = input_ids.size(1)
        feat, pos, nbb = self._get_img_feat(self.txt2img[txt_id])
        batch = iais_batch(input_ids, torch.arange(tl, dtype=torch.long).unsqueeze(0), feat.unsqueeze(0),
                           pos.unsqueeze(0), [tl], [nbb], all_rows=True)
        return PairBatch(txt_id, batch, tl - 2, nbb)
