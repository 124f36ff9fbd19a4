"""LMDB access: read-only media without lock files, one read transaction per thread."""
import os
import shutil
import stat
import threading

import torch

from conftest import IMG_DB, TXT_DB
from data import DetectFeatLmdb, TxtTokLmdb
from helpers import check_against_reference


def _read_only_copy(src, dst):
    shutil.copytree(src, dst)
    for root, dirs, files in os.walk(dst):
        for f in files:
            if f == "lock.mdb":
                os.remove(os.path.join(root, f))
    for root, dirs, files in os.walk(dst, topdown=False):
        for f in files:
            os.chmod(os.path.join(root, f), stat.S_IRUSR | stat.S_IRGRP)
        os.chmod(root, stat.S_IRUSR | stat.S_IXUSR)


def test_read_only_copy_without_lock_files(tmp_path):
    img_dir, txt_dir = tmp_path / "img", tmp_path / "txt"
    _read_only_copy(IMG_DB, img_dir)
    _read_only_copy(TXT_DB, txt_dir)
    try:
        check_against_reference(DetectFeatLmdb(str(img_dir), 0.2, 100, 10, 36, False))
        txt = TxtTokLmdb(str(txt_dir), -1)
        assert txt["test_flickr30k_000000000000_0"]["input_ids"] == [726, 483, 679, 341]
        for root, _, files in os.walk(tmp_path):
            assert "lock.mdb" not in files
    finally:
        for root, dirs, _ in os.walk(tmp_path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)


def test_each_thread_reads_through_its_own_transaction(txt_db, img_db):
    txns, feats = {}, {}
    both_read = threading.Barrier(2)  # both alive at once: a finished thread's id can be given again

    def read(tag):
        txns[tag] = img_db.txn._txn()
        feats[tag] = img_db["flickr30k_000000000007.npz"][0].clone()
        both_read.wait()

    threads = [threading.Thread(target=read, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert txns[0] is not txns[1] and txns[0] is not img_db.txn._txn()
    assert torch.equal(feats[0], feats[1]) and torch.equal(feats[0], img_db["flickr30k_000000000007.npz"][0])
