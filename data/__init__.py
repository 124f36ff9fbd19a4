from .batch import get_gather_index, pad_tensors
from .db import (DataError, DetectFeatLmdb, ImageLmdbGroup, ImgDbWriter, TxtLmdb, TxtTokLmdb,
                 compute_num_bb, write_txt_db)
from .itm import (ItmEvalDataset, ItmRankDatasetHardNegFromImage, ItmRankDatasetHardNegFromText,
                  ItmValDataset, itm_eval_collate, itm_rank_hn_collate, itm_val_collate,
                  sample_negative)
from .loader import WORKER_TYPES, PrefetchLoader, ResumableStream, ThreadLoader, make_loader
from .sampler import TokenBucketSampler
