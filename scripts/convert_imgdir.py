"""Convert a folder of BUTD region features (one .npz per image) into an img_db.

    python scripts/convert_imgdir.py --img_dir /feats/flickr30k --output /img_db --nproc 8

writes /img_db/flickr30k/feat_th0.2_max100_min10/ (LMDB) and nbb_th0.2_max100_min10.json.
Each .npz holds one image's boxes (NPZ_CONTRACT below, shown by --help); arrays are stored
as float16, cut to the boxes the setting keeps (all of them with --keep_all). Unreadable
files and unusable ones (no box, features not 2048-d, arrays of different lengths,
values that are not real, finite floats, boxes outside [0, 1]) are skipped and listed at
the end.
"""
import sys  # the repository this file is in comes first, whatever the path names (another clone, none)
from os.path import dirname, realpath
sys.path.insert(0, dirname(dirname(realpath(__file__))))
import utils.threads  # noqa: E402,F401  (next: sets the OpenMP thread count before torch loads OpenMP)
import argparse
import glob
import multiprocessing as mp
from functools import partial
from os.path import basename, isdir, join

import numpy as np
from tqdm import tqdm

from data import DataError, ImgDbWriter, compute_num_bb
from data.img_db import BOX_RANGE, writer_file_names
from model import IMG_DIM
from utils.cli import run
from utils.config import POSITIVE, add_box_selection_args, make_parser
from utils.outputs import refuse_overwriting_inputs, refuse_unwritable

ARRAYS = ("features", "norm_bb", "conf", "soft_labels")
NPZ_CONTRACT = """\
one .npz per image, named as the txt_db's img_fname names it (flickr30k_001000092795.npz);
n boxes, in the order of their confidence, highest first (the first nbb are the ones kept):
  features     [n, 2048] float   the region features (BUTD Faster R-CNN, pooled)
  norm_bb      [n, 6]    float   x1, y1, x2, y2, w, h of each box, x divided by the image's
                                 width and y by its height, so all in [0, 1]; w = x2 - x1,
                                 h = y2 - y1 (the model appends the area w * h)
  conf         [n]       float   the box's detection confidence; the box count of the
                                 setting is conf > conf_th, clipped to [min_bb, max_bb]
                                 (conf_th -1: the first num_bb); with --keep_all needed
                                 only by readers with a conf_th, which count boxes from it
  soft_labels  [n, C]    float   optional: class probabilities (C = 1601 for Visual Genome);
                                 stored, not read by training or evaluation
  nbb          []        int     the boxes to keep, read with --keep_all only
Any float dtype is taken and stored as float16 (values must be finite there: |x| < 65504;
complex and integer arrays are refused, as are boxes outside [0, 1]);
other keys are ignored. A file needs at least min_bb boxes (else lower --min_bb)."""


def check_arrays(arrays, nbb):
    """Refuse what the model cannot take: no box, features of another width, per-box
    arrays of different lengths, non-finite values (also those float16 cannot hold)."""
    feat, bb = arrays["features"], arrays["norm_bb"]
    if nbb < 1:
        raise ValueError("no boxes")
    if feat.ndim != 2 or feat.shape[1] != IMG_DIM:
        raise ValueError(f"features of shape {feat.shape}, expected [boxes, {IMG_DIM}]")
    if bb.ndim != 2 or bb.shape[1] != 6:
        raise ValueError(f"norm_bb of shape {bb.shape}, expected [boxes, 6]")
    lengths = {k: len(a) for k, a in arrays.items()}
    if set(lengths.values()) != {nbb}:
        raise ValueError(f"{nbb} boxes kept but the arrays hold {lengths} rows")
    for key in ("features", "norm_bb", "conf"):
        if key in arrays and not np.isfinite(arrays[key]).all():
            raise ValueError(f"non-finite values in {key} (as float16)")
    if bb.size and not (BOX_RANGE[0] <= bb.min() and bb.max() <= BOX_RANGE[1]):
        raise ValueError(f"norm_bb values in [{float(bb.min()):g}, {float(bb.max()):g}]: boxes must be normalised "
                         f"to [0, 1] (x divided by the image's width, y by its height), not in pixels")


def check_dtypes(dump):
    """Refuse arrays that are not real floats before the float16 cast, which would drop an
    imaginary part (with only a warning) or take integer pixel boxes as they are."""
    for key in ARRAYS:
        if key in dump and dump[key].dtype.kind != "f":
            raise ValueError(f"{key} of dtype {dump[key].dtype}, expected real floating point values")


def load_npz(path, conf_th, max_bb, min_bb, num_bb, keep_all):
    """-> (file name, arrays cut to the kept boxes, nbb) or (file name, None, error)."""
    name = basename(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            dump = {k: npz[k] for k in npz.files}
        if "features" not in dump or "norm_bb" not in dump:
            raise ValueError("no features/norm_bb arrays")
        check_dtypes(dump)
        if keep_all:
            if "nbb" not in dump or dump["nbb"].shape != () or dump["nbb"].dtype.kind not in "iu":
                raise ValueError("--keep_all reads the box count from an integer scalar 'nbb', which this file lacks")
            nbb = int(dump["nbb"])
        elif conf_th == -1:
            nbb = min(num_bb, len(dump["conf"]))
        else:
            nbb = compute_num_bb(dump["conf"], conf_th, min_bb, max_bb)
        arrays = {k: dump[k][:nbb].astype(np.float16) for k in ARRAYS if k in dump}
        check_arrays(arrays, nbb)
        return name, arrays, nbb
    except Exception as e:  # a damaged file must not stop a multi-hour conversion
        return name, None, f"{type(e).__name__}: {e}"


def build_parser():
    p = make_parser(__doc__.split("\n")[0])
    p.formatter_class, p.epilog = argparse.RawDescriptionHelpFormatter, f"the .npz files:\n{NPZ_CONTRACT}"
    a = p.add_argument
    a("--img_dir", required=True, help="folder of .npz files (its name names the img_db)")
    a("--output", required=True, help="img_db root; the DB goes to OUTPUT/<img_dir name>/")
    a("--nproc", type=int, default=8, valid=POSITIVE, help="worker processes")
    a("--compress", action="store_true", help="store compressed .npz values")
    a("--keep_all", action="store_true", help="keep every box (sub-DB 'all', nbb.json)")
    add_box_selection_args(p, num_bb=100)
    return p


def check_output(opts, img_dir):
    """Before any work: OUTPUT can be made and the img_db's files are none of the inputs."""
    refuse_unwritable("--output", opts.output, folder=True)
    names = writer_file_names(opts.conf_th, opts.max_bb, opts.min_bb, opts.num_bb, opts.compress, opts.keep_all)
    refuse_overwriting_inputs([("--output", join(opts.output, basename(img_dir), name), opts.output)
                               for name in names if name], [("--img_dir", img_dir)])


def main(opts):
    img_dir = opts.img_dir.rstrip("/")
    if not isdir(img_dir):
        raise DataError(f"--img_dir {img_dir} is not a directory")
    check_output(opts, img_dir)
    files = sorted(glob.glob(join(img_dir, "*.npz")))
    if not files:
        raise DataError(f"no .npz files in {img_dir}")
    writer = ImgDbWriter(join(opts.output, basename(img_dir)), opts.conf_th, opts.max_bb, opts.min_bb,
                         opts.num_bb, opts.compress, keep_all=opts.keep_all)
    load = partial(load_npz, conf_th=opts.conf_th, max_bb=opts.max_bb, min_bb=opts.min_bb,
                   num_bb=opts.num_bb, keep_all=opts.keep_all)
    corrupted = []
    with writer, mp.Pool(opts.nproc) as pool:
        for name, arrays, nbb in tqdm(pool.imap_unordered(load, files, chunksize=16),
                                      total=len(files), desc="converting"):
            if arrays is None:
                corrupted.append((name, nbb))
            else:
                writer.put(name, arrays, nbb)
        if len(corrupted) == len(files):
            raise DataError(f"none of the {len(files)} .npz files of {img_dir} is usable (first: {corrupted[0][0]}: "
                            f"{corrupted[0][1]}); remove the empty {writer.db_dir} before running again")
    print(f"wrote {len(files) - len(corrupted)} images to {writer.db_dir}")
    if corrupted:
        print(f"skipped {len(corrupted)} unreadable file(s):")
        for name, err in corrupted:
            print(f"  {name}: {err}")


if __name__ == "__main__":
    run(main, build_parser())
