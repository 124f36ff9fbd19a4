"""Data of the UNITER/IAIS release and the ITM datasets built on it.

errors.py         DataError, JSON index files
lmdb_io.py        LMDB opens, reads and writes
txt_db.py         txt_db: captions (TxtTokLmdb, write_txt_db) and the format's contract
feature_store.py  the FeatureStore protocol and open_img_db, the one factory of image feature stores
img_db.py         img_db: region features by box-selection setting (DetectFeatLmdb, ImgDbWriter)
                  and the format's contract (count files, each image's arrays)
karpathy.py       the Karpathy caption JSON that prepro_itm.py converts, and its contract
feature_codec.py  how an img_db value is encoded and decoded (in place)
captions.py       CaptionDataset: a process's captions with their images' features
itm.py            the hard-negative, validation and evaluation datasets; their collate
negatives.py      negative sampling (the original's draws, or seeded per item)
batch.py          batch layouts, masks, gather index
loader.py         thread/process loaders, device prefetch, the resumable training stream
groups.py         groups of confusable images for hard negatives; ISDa annotations
"""
from .batch import get_gather_index, pad_tensors
from .captions import CaptionDataset, PairBatch
from .errors import DataError
from .feature_store import FeatureStore, ImageLmdbGroup, open_img_db, register_store
from .img_db import DetectFeatLmdb, ImgDbWriter, compute_num_bb
from .itm import (ItmEvalDataset, ItmRankDatasetHardNegFromImage, ItmRankDatasetHardNegFromText,
                  ItmValDataset, itm_eval_collate, itm_rank_hn_collate, itm_val_collate)
from .loader import WORKER_TYPES, PrefetchLoader, ResumableStream, ThreadLoader, make_loader, prefetch_loader
from .negatives import sample_negative, seeded_draws
from .txt_db import TxtLmdb, TxtTokLmdb, write_txt_db
