"""data/feature_store.py: a new image-feature format is one reader class plus one
registration, and every reader of features (datasets, checks) takes it through
open_img_db."""
import json
import os
import random

import numpy as np
import pytest
import torch

from conftest import IMG_DB, TINY_CONFIG
from data import FeatureStore, ItmEvalDataset, ItmRankDatasetHardNegFromText, open_img_db, register_store
from data import feature_store
from engine.checks import check_split
from helpers import same_batch
from model import IMG_DIM, UniterConfig


class NpzFolder:
    """A toy format: one .npz per image (features, norm_bb) and boxes.json with the counts."""

    def __init__(self, path, conf_th, max_bb, min_bb, num_bb, compress):
        self.db_dir = path
        with open(os.path.join(path, "boxes.json")) as f:
            self.name2nbb = json.load(f)

    def read_arrays(self, fname, keys=("features", "norm_bb"), cut=True):
        with np.load(os.path.join(self.db_dir, fname + ".npz")) as arrays:
            n = self.name2nbb[fname] if cut else None
            return {k: arrays[k][:n] for k in keys}

    def __getitem__(self, fname):
        arrays = self.read_arrays(fname)
        return torch.from_numpy(arrays["features"]), torch.from_numpy(arrays["norm_bb"])


@pytest.fixture
def npz_folder(tmp_path, img_db):
    """The fixture img_db's images written in the toy format, and the format registered."""
    for name in img_db.name2nbb:
        np.savez(tmp_path / f"{name}.npz", **img_db.read_arrays(name, cut=False))
    (tmp_path / "boxes.json").write_text(json.dumps(img_db.name2nbb))
    before = list(feature_store._STORES)
    register_store("npz-folder", NpzFolder, recognises=lambda p: os.path.exists(os.path.join(p, "boxes.json")))
    yield str(tmp_path)
    feature_store._STORES[:] = before


def test_a_registered_format_serves_the_same_batches(npz_folder, txt_db, img_db):
    store = open_img_db(npz_folder)
    assert isinstance(store, NpzFolder) and isinstance(store, FeatureStore)
    assert isinstance(open_img_db(IMG_DB), type(img_db))  # the release's LMDB is still the default
    for cls, args in ((ItmEvalDataset, (8,)), (ItmRankDatasetHardNegFromText, (3,))):
        random.seed(0)
        a = cls(txt_db, store, *args)[0]
        random.seed(0)
        b = cls(txt_db, img_db, *args)[0]
        pairs = zip(a, b) if isinstance(a, list) else [(a, b)]
        assert all(same_batch(x, y) for x, y in pairs), cls.__name__
    check_split(txt_db, store, UniterConfig.from_json_file(TINY_CONFIG), IMG_DIM)


def test_datasets_refuse_what_is_not_a_store(txt_db):
    with pytest.raises(TypeError, match="FeatureStore"):
        ItmEvalDataset(txt_db, {"name2nbb": {}}, 8)
