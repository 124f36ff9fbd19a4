"""The img_db format: region features of one image set, in an LMDB sub-directory named
after the box-selection settings, with the box count of every image beside it.
How one value is decoded is data/feature_codec.py.

This module owns the format's contract (README "What is checked"): the count file
(read_box_counts: every count a positive integer), each value as it is first read
(check_image_arrays: shapes, dtypes, finite values, boxes in image coordinates, as many
rows as the count file keeps, the same feature width as the DB's other images), and
values of the other kind than the sub-directory's name says (compressed or plain)."""
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
# norm_bb is divided by the image's size, so [0, 1]; detectors and the release's own files
# put box edges a little past the border, pixel boxes are tens to hundreds
BOX_RANGE = (-0.1, 1.1)


def read_box_counts(path):
    """{img_fname: nbb} of a count file (nbb_th*_max*_min*.json or nbb.json): each a positive integer."""
    name2nbb = load_json_map(path, int, "box counts")
    bad = next((name for name, n in name2nbb.items() if n < 1), None)
    if bad is not None:
        raise DataError(f"{path}: image {bad!r} has {name2nbb[bad]} boxes; every image needs at least one box "
                        f"(0 and negative counts are refused): rebuild the img_db or drop the image")
    return name2nbb


def check_image_arrays(arrays, nbb=None, feat_dim=None):
    """What is wrong with one image's arrays (None: nothing): features [n, D] and norm_bb
    [n, 6] of real floating dtype, finite, boxes within BOX_RANGE, at least ``nbb`` rows,
    D == ``feat_dim`` when given; ``conf`` [n] when present."""
    for key, arr in arrays.items():
        if arr.dtype.kind != "f":
            return f"{key} of dtype {arr.dtype}, expected real floating point values"
    feat, bb = arrays.get("features"), arrays.get("norm_bb")
    if feat is not None:
        if feat.ndim != 2:
            return f"features of shape {feat.shape}, expected [boxes, dim]"
        if feat_dim is not None and feat.shape[1] != feat_dim:
            return f"features of shape {feat.shape}, expected [boxes, {feat_dim}] as the DB's other images"
    rows = len(feat) if feat is not None else None
    if bb is not None:
        if bb.ndim != 2 or bb.shape[1] != 6 or (rows is not None and bb.shape[0] != rows):
            return f"norm_bb of shape {bb.shape}, expected [{rows if rows is not None else 'boxes'}, 6]"
        rows = len(bb)
    conf = arrays.get("conf")
    if conf is not None and (conf.ndim != 1 or (rows is not None and len(conf) != rows)):
        return f"conf of shape {conf.shape}, expected [{rows if rows is not None else 'boxes'}]"
    for key in ("features", "norm_bb"):
        if key in arrays and not np.isfinite(arrays[key]).all():
            return f"non-finite values in {key}"
    if bb is not None and bb.size and not (BOX_RANGE[0] <= bb.min() and bb.max() <= BOX_RANGE[1]):
        return (f"norm_bb values in [{float(bb.min()):g}, {float(bb.max()):g}]: boxes must be divided by the "
                f"image's size (all in [0, 1]), not in pixels")
    if nbb is not None and rows is not None and rows < nbb:
        return f"{rows} boxes stored but the box counts say {nbb}"
    return None


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
        self.counts_file = None  # the JSON file the box counts come from, if any
        self.feat_dim = None  # the width of the first image's features read by this process
        db_name, nbb_file = img_db_names(conf_th, max_bb, min_bb, num_bb, compress)
        if conf_th == -1:
            name2nbb = None
        elif exists(join(img_dir, nbb_file)):
            name2nbb = read_box_counts(join(img_dir, nbb_file))
            self.counts_file = join(img_dir, nbb_file)
        else:
            name2nbb = None
            fallback = "all_compressed" if compress else "all"
            if exists(join(img_dir, fallback)):
                db_name = fallback
                if not compress:
                    name2nbb = read_box_counts(join(img_dir, "nbb.json"))
                    self.counts_file = join(img_dir, "nbb.json")
        if not exists(join(img_dir, db_name)):
            present = sorted(d for d in os.listdir(img_dir) if isdir(join(img_dir, d)))
            raise DataError(f"{img_dir} has no {db_name}/ for conf_th={conf_th} max_bb={max_bb} "
                            f"min_bb={min_bb} num_bb={num_bb} compressed={compress} "
                            f"(found: {', '.join(present) or 'nothing'})")
        self.db_dir = join(img_dir, db_name)
        self.txn = ReadOnlyLmdb(self.db_dir)
        self._checked = set()  # images whose features and boxes passed check_image_arrays
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
        is_npz = bytes(raw[:2]) == b"PK"  # a zip archive: what np.savez_compressed writes
        if is_npz != bool(self.compress):
            stored, named = ("compressed (.npz)", "plain") if is_npz else ("plain (msgpack)", "compressed")
            raise DataError(f"{self.db_dir}: image {fname!r} holds a {stored} value but the sub-DB's name says "
                            f"{named}; rename the sub-DB (a _compressed suffix for .npz values) or rebuild it")
        try:
            arrays = decode_img_dump(raw, self.compress, keys)
        except Exception as e:
            raise DataError(f"{self.db_dir}: corrupt value for key {fname!r} ({type(e).__name__}: {e})") from None
        if not isinstance(arrays, dict) or not all(isinstance(a, np.ndarray) for a in arrays.values()):
            raise DataError(f"{self.db_dir}: value of image {fname!r} is not a map of arrays; rebuild the img_db")
        missing = [k for k in (keys or ()) if k not in arrays]
        if missing:
            raise DataError(f"{self.db_dir}: image {fname!r} has no {', '.join(missing)} array; rebuild the img_db")
        if fname not in self._checked:
            self._check_arrays(fname, arrays)
        if cut:
            nbb = self.name2nbb[fname]
            arrays = {k: a[:nbb] for k, a in arrays.items()}
        return arrays

    def _check_arrays(self, fname, arrays):
        """A bad value (non-finite, another width, boxes of another layout) gives NaN scores
        or a crash far from its cause, half-way through an evaluation: each image is checked
        the first time this process reads its features (a full scan of 100 GB is not a
        start-up check)."""
        # counts of conf_th -1 are a setting (num_bb), not a file: an image may hold fewer
        nbb = self.name2nbb.get(fname) if self.counts_file is not None else None
        problem = check_image_arrays(arrays, nbb, self.feat_dim)
        if problem:
            raise DataError(f"{self.db_dir}: image {fname!r} has {problem}; rebuild its features or drop it "
                            f"from the txt_db")
        if "features" in arrays and "norm_bb" in arrays:
            self.feat_dim = self.feat_dim or arrays["features"].shape[1]
            self._checked.add(fname)

    def missing_images(self, names):
        """One line on the images of ``names`` that this store cannot give (None: it has
        them all), naming the count file when it is the file that lacks them."""
        missing = sorted(set(names) - set(self.name2nbb))
        if not missing:
            return None
        if self.counts_file is not None:
            stored = set(self.keys())
            in_lmdb = [m for m in missing if m in stored]
            if in_lmdb:
                return (f"{len(in_lmdb)} image(s) in {self.db_dir} lack a box count in {self.counts_file} (first: "
                        f"{', '.join(in_lmdb[:3])}); rebuild the count file with the img_db")
        return f"{len(missing)} image(s) are not in {self.db_dir} (first: {', '.join(missing[:3])})"

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
