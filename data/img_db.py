"""The img_db format: region features of one image set, in an LMDB sub-directory named
after the box-selection settings, with the box count of every image beside it.
How one value is decoded is data/feature_codec.py."""
import json
import os
from os.path import exists, isdir, join

import numpy as np
import torch

from utils.outputs import write_json

from .errors import DataError, load_json_map
from .feature_codec import decode_img_dump, encode_img_dump
from .feature_store import register_store
from .lmdb_io import ReadOnlyLmdb, WriteTxn

IMG_DB_KEYS = "__keys__"


def compute_num_bb(conf, conf_th, min_bb, max_bb):
    """Boxes kept for an image: those above conf_th, clipped to [min_bb, max_bb]."""
    return int(min(max_bb, max(min_bb, int((np.asarray(conf) > conf_th).sum()))))


def img_db_names(conf_th, max_bb, min_bb, num_bb, compress):
    """(LMDB sub-directory, count file) of a box-selection setting."""
    if conf_th == -1:
        db_name, nbb_file = f"feat_numbb{num_bb}", None
    else:
        db_name = f"feat_th{conf_th}_max{max_bb}_min{min_bb}"
        nbb_file = f"nbb_th{conf_th}_max{max_bb}_min{min_bb}.json"
    return db_name + ("_compressed" if compress else ""), nbb_file


def writer_file_names(conf_th, max_bb, min_bb, num_bb, compress, keep_all=False):
    """(LMDB sub-directory, count file or None) that ImgDbWriter writes for a setting."""
    if keep_all:  # every box, counts in nbb.json (the 'all' sub-DB)
        return "all" + ("_compressed" if compress else ""), "nbb.json"
    return img_db_names(conf_th, max_bb, min_bb, num_bb, compress)


class DetectFeatLmdb:
    """Region features of one image set. ``img_db[fname] -> (features, norm_bb)``:
    features [nbb, 2048] in their stored float16, norm_bb [nbb, 6] float32."""

    def __init__(self, img_dir, conf_th=0.2, max_bb=100, min_bb=10, num_bb=36, compress=True):
        if not isdir(img_dir):
            raise DataError(f"img_db {img_dir} not found")
        self.img_dir, self.conf_th, self.max_bb, self.min_bb = img_dir, conf_th, max_bb, min_bb
        self.compress = compress
        db_name, nbb_file = img_db_names(conf_th, max_bb, min_bb, num_bb, compress)
        if conf_th == -1:
            name2nbb = None
        elif exists(join(img_dir, nbb_file)):
            name2nbb = load_json_map(join(img_dir, nbb_file), int, "box counts")
        else:
            name2nbb = None
            fallback = "all_compressed" if compress else "all"
            if exists(join(img_dir, fallback)):
                db_name = fallback
                if not compress:
                    name2nbb = load_json_map(join(img_dir, "nbb.json"), int, "box counts")
        if not exists(join(img_dir, db_name)):
            present = sorted(d for d in os.listdir(img_dir) if isdir(join(img_dir, d)))
            raise DataError(f"{img_dir} has no {db_name}/ for conf_th={conf_th} max_bb={max_bb} "
                            f"min_bb={min_bb} num_bb={num_bb} compressed={compress} "
                            f"(found: {', '.join(present) or 'nothing'})")
        self.db_dir = join(img_dir, db_name)
        self.txn = ReadOnlyLmdb(self.db_dir)
        self._finite = set()  # images whose features and boxes were found finite
        if conf_th == -1:
            self.name2nbb = {name: num_bb for name in self.keys()}
        else:
            self.name2nbb = name2nbb if name2nbb is not None else self._compute_nbb()

    def keys(self):
        raw = self.txn.get(IMG_DB_KEYS.encode())
        if raw is not None:
            return json.loads(bytes(raw).decode("utf-8"))
        return [bytes(k).decode("utf-8") for k, _ in self.txn.items() if bytes(k) != IMG_DB_KEYS.encode()]

    def _compute_nbb(self):
        return {name: compute_num_bb(self.read_arrays(name, ("conf",), cut=False)["conf"],
                                     self.conf_th, self.min_bb, self.max_bb)
                for name in self.keys()}

    def read_arrays(self, fname, keys=("features", "norm_bb"), cut=True):
        """Named arrays of one image, cut to its box count unless cut=False."""
        raw = self.txn.get(fname.encode("utf-8"))
        if raw is None:
            raise DataError(f"{self.db_dir}: image {fname!r} not in the LMDB")
        try:
            arrays = decode_img_dump(raw, self.compress, keys)
        except Exception as e:
            raise DataError(f"{self.db_dir}: corrupt value for key {fname!r} ({type(e).__name__}: {e})") from None
        if fname not in self._finite:
            self._check_finite(fname, arrays)
        if cut:
            nbb = self.name2nbb[fname]
            arrays = {k: a[:nbb] for k, a in arrays.items()}
        return arrays

    def _check_finite(self, fname, arrays):
        """Non-finite features or boxes give NaN scores and gradients far from their cause:
        each image is checked the first time this process reads its features."""
        checked = [k for k in ("features", "norm_bb") if k in arrays]
        for key in checked:
            if not np.isfinite(arrays[key]).all():
                raise DataError(f"{self.db_dir}: image {fname!r} has non-finite values in {key}; "
                                f"rebuild its features or drop it from the txt_db")
        if len(checked) == 2:
            self._finite.add(fname)

    def __getitem__(self, fname):
        arrays = self.read_arrays(fname)
        feat = torch.from_numpy(np.array(arrays["features"]))
        norm_bb = torch.from_numpy(arrays["norm_bb"].astype(np.float32))
        return feat, norm_bb


class ImgDbWriter:
    """Writes an img_db in the release layout: LMDB values plus ``__keys__`` and the
    box-count JSON of the chosen setting."""

    def __init__(self, img_dir, conf_th=0.2, max_bb=100, min_bb=10, num_bb=36, compress=False,
                 keep_all=False):
        self.img_dir, self.compress = img_dir, compress
        self.conf_th, self.max_bb, self.min_bb, self.num_bb = conf_th, max_bb, min_bb, num_bb
        db_name, self.nbb_file = writer_file_names(conf_th, max_bb, min_bb, num_bb, compress, keep_all)
        self.db_dir = join(img_dir, db_name)
        if exists(join(self.db_dir, "data.mdb")):
            raise DataError(f"{self.db_dir} already exists; remove it or choose another output")
        self._writer = WriteTxn(self.db_dir, every=500)
        self.name2nbb = {}

    def box_count(self, conf):
        """Boxes kept under the writer's setting for an image with these confidences."""
        if self.conf_th == -1:
            return min(self.num_bb, len(conf))
        return compute_num_bb(conf, self.conf_th, self.min_bb, self.max_bb)

    def put(self, fname, arrays, nbb=None):
        """arrays: features/norm_bb/conf/soft_labels (stored as float16); nbb defaults to
        the count implied by ``conf`` and the writer's setting."""
        arrays = {k: np.asarray(a, dtype=np.float16) for k, a in arrays.items()}
        if nbb is None:
            nbb = self.box_count(arrays["conf"])
        self._writer.put(fname, encode_img_dump(arrays, self.compress))
        self.name2nbb[fname] = int(nbb)

    def close(self):
        self._writer.put(IMG_DB_KEYS, json.dumps(list(self.name2nbb)).encode("utf-8"))
        self._writer.commit()
        if self.nbb_file:
            write_json(join(self.img_dir, self.nbb_file), self.name2nbb)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self._writer.abort()


register_store("lmdb", DetectFeatLmdb)
