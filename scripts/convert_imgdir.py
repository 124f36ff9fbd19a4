"""Convert a folder of BUTD region features (one .npz per image) into an img_db.

    python scripts/convert_imgdir.py --img_dir /feats/flickr30k --output /img_db --nproc 8

writes /img_db/flickr30k/feat_th0.2_max100_min10/ (LMDB) and nbb_th0.2_max100_min10.json.
Each .npz holds features [n, 2048], norm_bb [n, 6], conf [n], soft_labels [n, 1601] and
nbb; arrays are stored as float16, cut to the boxes the setting keeps (all of them with
--keep_all). Unreadable files are skipped and listed at the end.
"""
import argparse
import glob
import multiprocessing as mp
import sys
from functools import partial
from os.path import abspath, basename, dirname, isdir, join

import numpy as np
from tqdm import tqdm

sys.path.insert(0, dirname(dirname(abspath(__file__))))
from data.db import DataError, ImgDbWriter, compute_num_bb  # noqa: E402

ARRAYS = ("features", "norm_bb", "conf", "soft_labels")


def load_npz(path, conf_th, max_bb, min_bb, num_bb, keep_all):
    """-> (file name, arrays cut to the kept boxes, nbb) or (file name, None, error)."""
    name = basename(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            dump = {k: npz[k] for k in npz.files}
        if keep_all:
            nbb = int(dump["nbb"])
        elif conf_th == -1:
            nbb = min(num_bb, len(dump["conf"]))
        else:
            nbb = compute_num_bb(dump["conf"], conf_th, min_bb, max_bb)
        arrays = {k: dump[k][:nbb].astype(np.float16) for k in ARRAYS if k in dump}
        if "features" not in arrays or "norm_bb" not in arrays:
            raise ValueError("no features/norm_bb arrays")
        return name, arrays, nbb
    except Exception as e:  # a damaged file must not stop a multi-hour conversion
        return name, None, f"{type(e).__name__}: {e}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--img_dir", required=True, help="folder of .npz files (its name names the img_db)")
    p.add_argument("--output", required=True, help="img_db root; the DB goes to OUTPUT/<img_dir name>/")
    p.add_argument("--nproc", type=int, default=8, help="worker processes")
    p.add_argument("--compress", action="store_true", help="store compressed .npz values")
    p.add_argument("--keep_all", action="store_true", help="keep every box (sub-DB 'all', nbb.json)")
    p.add_argument("--conf_th", type=float, default=0.2, help="confidence threshold (-1: fixed num_bb)")
    p.add_argument("--max_bb", type=int, default=100, help="max boxes per image")
    p.add_argument("--min_bb", type=int, default=10, help="min boxes per image")
    p.add_argument("--num_bb", type=int, default=100, help="boxes per image when conf_th is -1")
    opts = p.parse_args()

    img_dir = opts.img_dir.rstrip("/")
    if not isdir(img_dir):
        sys.exit(f"convert_imgdir.py: error: --img_dir {img_dir} is not a directory")
    files = sorted(glob.glob(join(img_dir, "*.npz")))
    if not files:
        sys.exit(f"convert_imgdir.py: error: no .npz files in {img_dir}")
    out_dir = join(opts.output, basename(img_dir))
    try:
        writer = ImgDbWriter(out_dir, opts.conf_th, opts.max_bb, opts.min_bb, opts.num_bb,
                             opts.compress, keep_all=opts.keep_all)
    except DataError as e:
        sys.exit(f"convert_imgdir.py: error: {e}")
    load = partial(load_npz, conf_th=opts.conf_th, max_bb=opts.max_bb, min_bb=opts.min_bb,
                   num_bb=opts.num_bb, keep_all=opts.keep_all)
    corrupted = []
    with writer, mp.Pool(max(1, opts.nproc)) as pool:
        for name, arrays, nbb in tqdm(pool.imap_unordered(load, files, chunksize=16),
                                      total=len(files), desc="converting"):
            if arrays is None:
                corrupted.append((name, nbb))
            else:
                writer.put(name, arrays, nbb)
    print(f"wrote {len(files) - len(corrupted)} images to {writer.db_dir}")
    if corrupted:
        print(f"skipped {len(corrupted)} unreadable file(s):")
        for name, err in corrupted:
            print(f"  {name}: {err}")


if __name__ == "__main__":
    main()
