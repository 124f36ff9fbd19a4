"""The img_db format: the release DBs read byte for byte, the writer's layout, box counts,
errors that name the sub-DB or the image."""
import io
import json
import os

import msgpack
import msgpack_numpy
import numpy as np
import pytest

from conftest import IMG_DB
from data import DataError, DetectFeatLmdb, ImageLmdbGroup, ImgDbWriter
from helpers import check_against_reference, img_db_with_corrupt_value


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "compressed"])
def test_release_img_db_reads_exactly(compress):
    check_against_reference(DetectFeatLmdb(IMG_DB, 0.2, 100, 10, 36, compress))


def test_img_db_group_opens_each_db_once():
    group = ImageLmdbGroup(0.2, 100, 10, 36, False)
    assert group[IMG_DB] is group[IMG_DB + "/"]


def test_box_counts_computed_from_conf_without_count_file(tmp_path):
    """No count file: the 'all' sub-DB, counts from conf (min/max clipped)."""
    rng = np.random.default_rng(0)
    confs = {"a.npz": np.array([0.9, 0.5, 0.1, 0.05]), "b.npz": np.array([0.9] * 6)}
    w = ImgDbWriter(str(tmp_path), conf_th=0.2, max_bb=5, min_bb=1, compress=True)
    for name, conf in confs.items():
        n = len(conf)
        w.put(name, {"features": rng.standard_normal((n, 8)), "norm_bb": rng.random((n, 6)),
                     "conf": conf, "soft_labels": rng.random((n, 3))})
    w.close()
    os.rename(tmp_path / "feat_th0.2_max5_min1_compressed", tmp_path / "all_compressed")
    os.remove(tmp_path / "nbb_th0.2_max5_min1.json")
    db = DetectFeatLmdb(str(tmp_path), 0.2, 5, 1, 36, True)
    assert db.name2nbb == {"a.npz": 2, "b.npz": 5}
    assert db["b.npz"][0].shape == (5, 8)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "compressed"])
def test_img_writer_round_trip_and_original_layout(tmp_path, compress):
    rng = np.random.default_rng(1)
    arrays = {"features": rng.standard_normal((12, 2048)).astype(np.float16),
              "norm_bb": rng.random((12, 6)).astype(np.float16),
              "conf": np.linspace(1, 0, 12).astype(np.float16),
              "soft_labels": rng.random((12, 1601)).astype(np.float16)}
    with ImgDbWriter(str(tmp_path), 0.2, 100, 3, 36, compress) as w:
        w.put("x.npz", arrays)
    db = DetectFeatLmdb(str(tmp_path), 0.2, 100, 3, 36, compress)
    nbb = int((arrays["conf"] > 0.2).sum())
    assert db.name2nbb == {"x.npz": nbb}
    feat, bb = db["x.npz"]
    assert np.array_equal(feat.numpy(), arrays["features"][:nbb])
    assert np.array_equal(bb.numpy(), arrays["norm_bb"][:nbb].astype(np.float32))
    # decodable the way the original reader decodes it
    raw = bytes(db.txn.get(b"x.npz"))
    assert json.loads(bytes(db.txn.get(b"__keys__"))) == ["x.npz"]
    if compress:
        dump = np.load(io.BytesIO(raw), allow_pickle=True)
    else:
        dump = msgpack.loads(raw, raw=False, object_hook=msgpack_numpy.decode)
    for k, a in arrays.items():
        assert np.array_equal(dump[k], a)


def test_corrupt_lmdb_value_names_the_key(tmp_path):
    db = DetectFeatLmdb(img_db_with_corrupt_value(tmp_path / "img", "flickr30k_000000000003.npz"),
                        0.2, 100, 10, 36, False)
    with pytest.raises(DataError, match="flickr30k_000000000003.npz"):
        db["flickr30k_000000000003.npz"]


def test_missing_sub_db_names_the_setting():
    with pytest.raises(DataError, match="feat_th0.3_max100_min10"):
        DetectFeatLmdb(IMG_DB, 0.3, 100, 10, 36, False)
