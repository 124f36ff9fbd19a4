from .batch import get_gather_index, pad_tensors
from .errors import DataError
from .img_db import DetectFeatLmdb, ImageLmdbGroup, ImgDbWriter, compute_num_bb
from .itm import (ItmEvalDataset, ItmRankDatasetHardNegFromImage, ItmRankDatasetHardNegFromText,
                  ItmValDataset, itm_eval_collate, itm_rank_hn_collate, itm_val_collate)
from .loader import WORKER_TYPES, PrefetchLoader, ResumableStream, ThreadLoader, make_loader
from .negatives import sample_negative, seeded_draws
from .txt_db import TxtLmdb, TxtTokLmdb, write_txt_db
