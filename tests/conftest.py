import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import utils.threads  # noqa: E402,F401  (before torch: sets the OpenMP thread count before torch loads OpenMP)

import pytest  # noqa: E402
import torch  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "original")
TXT_DB = os.path.join(FIXTURES, "orig_db", "txt_db", "itm_flickr30k_test.db")
IMG_DB = os.path.join(FIXTURES, "orig_db", "img_db", "flickr30k")
TINY_CONFIG = os.path.join(FIXTURES, "uniter-tiny.json")


def load_fixture(name):
    return torch.load(os.path.join(FIXTURES, name), weights_only=True)


@pytest.fixture(scope="session")
def ref_model_state():
    return load_fixture("ref_model.pt")


@pytest.fixture
def txt_db():
    from data import TxtTokLmdb
    return TxtTokLmdb(TXT_DB, -1)


@pytest.fixture
def img_db():
    from data import DetectFeatLmdb
    return DetectFeatLmdb(IMG_DB, 0.2, 100, 10, 36, False)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (make gpu-check runs them: pytest -m cuda)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU (make gpu-check runs these on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
