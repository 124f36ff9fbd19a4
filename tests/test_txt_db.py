"""The txt_db format: written and read back as the release lays it out; errors name the file."""
import os
import shutil

import pytest

from conftest import TXT_DB
from data import DataError, TxtTokLmdb, write_txt_db
from data.txt_db import decode_txt


def test_txt_writer_round_trip(tmp_path):
    examples = {"t0": {"input_ids": [5, 6, 7], "img_fname": "a.npz"},
                "t1": {"input_ids": [8], "img_fname": "a.npz"},
                "t2": {"input_ids": [9, 9], "img_fname": "b.npz"}}
    meta = {"CLS": 101, "SEP": 102, "MASK": 103, "UNK": 100, "v_range": [106, 200], "toker": "x"}
    write_txt_db(str(tmp_path / "db"), examples, meta)
    db = TxtTokLmdb(str(tmp_path / "db"), 2)
    assert list(db.id2len) == ["t1", "t2"]
    assert db.img2txts == {"a.npz": ["t0", "t1"], "b.npz": ["t2"]}
    assert db["t0"]["input_ids"] == [5, 6, 7]
    assert db.combine_inputs([5, 6]).tolist() == [101, 5, 6, 102]
    assert decode_txt(bytes(db.db.txn.get(b"t2"))) == examples["t2"]


def test_txt_db_errors_name_the_culprit(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        TxtTokLmdb(str(tmp_path / "nowhere"), 60)
    bad = tmp_path / "txt"
    shutil.copytree(TXT_DB, bad)
    os.remove(bad / "meta.json")
    with pytest.raises(DataError, match="meta.json"):
        TxtTokLmdb(str(bad), 60)
