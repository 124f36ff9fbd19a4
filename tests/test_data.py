"""Data layer: the release formats byte for byte, the original's batches, writers, errors."""
import hashlib
import json
import os
import random
import shutil
import stat
import sys

import msgpack
import msgpack_numpy
import numpy as np
import pytest
import torch

from conftest import IMG_DB, TXT_DB, load_fixture
from data import (DataError, DetectFeatLmdb, ImageLmdbGroup, ImgDbWriter, ItmEvalDataset,
                  ItmRankDatasetHardNegFromImage, ItmRankDatasetHardNegFromText, ItmValDataset,
                  TxtTokLmdb, write_txt_db)
from data.txt_db import decode_txt

REF_FEATS = load_fixture("ref_img_feats.pt")


def _check_against_reference(img_db):
    assert img_db.name2nbb == REF_FEATS["name2nbb"]
    for name, ref in REF_FEATS["feats"].items():
        feat, norm_bb = img_db[name]
        as_loaded = feat.float().numpy()
        assert list(as_loaded.shape) == ref["shape"]
        assert hashlib.sha256(as_loaded.tobytes()).hexdigest() == ref["features_sha256"]
        assert torch.equal(norm_bb, ref["norm_bb"].float())


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "compressed"])
def test_release_img_db_reads_exactly(compress):
    _check_against_reference(DetectFeatLmdb(IMG_DB, 0.2, 100, 10, 36, compress))


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
        _check_against_reference(DetectFeatLmdb(str(img_dir), 0.2, 100, 10, 36, False))
        txt = TxtTokLmdb(str(txt_dir), -1)
        assert txt["test_flickr30k_000000000000_0"]["input_ids"] == [726, 483, 679, 341]
        for root, _, files in os.walk(tmp_path):
            assert "lock.mdb" not in files
    finally:
        for root, dirs, _ in os.walk(tmp_path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)


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
        import io
        dump = np.load(io.BytesIO(raw), allow_pickle=True)
    else:
        dump = msgpack.loads(raw, raw=False, object_hook=msgpack_numpy.decode)
    for k, a in arrays.items():
        assert np.array_equal(dump[k], a)


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


CASES = load_fixture("ref_hardneg.pt")


def _rebuild(case, txt_db, img_db):
    cls = ItmRankDatasetHardNegFromText if case["sample_from"] == "t" else ItmRankDatasetHardNegFromImage
    if case["IAIS"]:
        random.seed(6)
        ds = cls(txt_db, img_db, 7, case["IAIS"].split("-")[1])
        items = {0: ds[0]}
        items[17] = ds[17]
    else:
        random.seed(7)
        items = {5: cls(txt_db, img_db, 7, False)[5]}
    return items[case["idx"]]


@pytest.mark.parametrize("case", CASES, ids=[f"{c['sample_from']}-{c['IAIS']}-{c['idx']}" for c in CASES])
def test_hard_negative_batches_rebuilt_exactly(case, txt_db, img_db):
    batch = _rebuild(case, txt_db, img_db)
    assert set(batch) == set(case["batch"])
    for k, ref in case["batch"].items():
        assert batch[k].dtype == ref.dtype, k
        assert torch.equal(batch[k], ref), k


def test_eval_dataset_order(txt_db, img_db):
    ref = load_fixture("ref_eval.pt")
    ds = ItmEvalDataset(txt_db, img_db, 8)
    assert ds.ids == ref["txt_ids"] and ds.all_img_ids == ref["img_ids"]
    batches = ds[0]
    assert [b["img_feat"].size(0) for b in batches] == [8, 4]


def test_val_dataset_wraps_around(txt_db, img_db):
    ds = ItmValDataset(txt_db, img_db, 5)
    last = len(ds) - 1
    gt, negs = ds._get_batch_ids(last)
    imgs = ds.all_img_ids
    j = imgs.index(gt)
    assert negs == [imgs[(j + k) % len(imgs)] for k in range(1, 5)]
    assert ds[last]["img_feat"].size(0) == 5


def test_negatives_never_overlap_positives(txt_db, img_db):
    random.seed(0)
    t = ItmRankDatasetHardNegFromText(txt_db, img_db, 7, False)
    i = ItmRankDatasetHardNegFromImage(txt_db, img_db, 7, False)
    for k in range(len(t)):
        random.seed(k)
        from data.negatives import sample_negative
        gt = t.txt2img[t.ids[k]]
        assert gt not in sample_negative(t.img_name_list, [gt], 7)
        own = i.img2txts[gt]
        assert not set(own) & set(sample_negative(i.txt_name_list, own, 7))


@pytest.mark.parametrize("world", [2, 3])
def test_sharding_is_disjoint_and_complete(txt_db, img_db, world):
    shards = [ItmRankDatasetHardNegFromText(txt_db, img_db, 3, rank=rank, world_size=world).ids
              for rank in range(world)]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == len(txt_db.id2len)
    assert shards[1] == list(txt_db.id2len)[1::world]


def test_errors_name_the_culprit(tmp_path, txt_db, img_db):
    with pytest.raises(DataError, match="nowhere"):
        TxtTokLmdb(str(tmp_path / "nowhere"), 60)
    bad = tmp_path / "txt"
    shutil.copytree(TXT_DB, bad)
    os.remove(bad / "meta.json")
    with pytest.raises(DataError, match="meta.json"):
        TxtTokLmdb(str(bad), 60)
    with pytest.raises(DataError, match="feat_th0.3_max100_min10"):
        DetectFeatLmdb(IMG_DB, 0.3, 100, 10, 36, False)
    with pytest.raises(DataError, match="raise --max_txt_len"):
        ItmRankDatasetHardNegFromText(TxtTokLmdb(TXT_DB, 1), img_db, 3)
    with pytest.raises(DataError, match="mini-batch size 13"):
        ItmValDataset(txt_db, img_db, 13)


def test_captions_without_image_are_reported(tmp_path, img_db):
    bad = tmp_path / "txt"
    shutil.copytree(TXT_DB, bad)
    t2i = json.loads((bad / "txt2img.json").read_text())
    first = next(iter(t2i))
    t2i[first] = "missing_image.npz"
    (bad / "txt2img.json").write_text(json.dumps(t2i))
    with pytest.raises(DataError, match=r"1 image\(s\).*missing_image.npz"):
        ItmRankDatasetHardNegFromText(TxtTokLmdb(str(bad), -1), img_db, 3)


def test_corrupt_lmdb_value_names_the_key(tmp_path):
    from helpers import img_db_with_corrupt_value
    db = DetectFeatLmdb(img_db_with_corrupt_value(tmp_path / "img", "flickr30k_000000000003.npz"),
                        0.2, 100, 10, 36, False)
    with pytest.raises(DataError, match="flickr30k_000000000003.npz"):
        db["flickr30k_000000000003.npz"]


def test_decoder_equals_msgpack_numpy(img_db):
    """Our plain-value decoder gives exactly what msgpack-numpy decodes, reads the arrays in
    place (views of the stored bytes), and builds only the arrays it is asked for."""
    from data.feature_codec import decode_img_dump
    for name in img_db.name2nbb:
        raw = bytes(img_db.txn.get(name.encode()))
        ref = msgpack.loads(raw, raw=False, object_hook=msgpack_numpy.decode)
        fast = decode_img_dump(raw, False)
        assert fast.keys() == ref.keys()
        for k in ref:
            assert fast[k].dtype == ref[k].dtype and np.array_equal(fast[k], ref[k])
            assert np.shares_memory(fast[k], np.frombuffer(raw, np.uint8))
        assert list(decode_img_dump(raw, False, ("features",))) == ["features"]


def test_decoder_falls_back_on_unusual_encodings():
    """Values with msgpack types numpy dumps do not use (here a float and an ext field) still
    decode, through the reference decoder."""
    from data.feature_codec import decode_img_dump
    arrays = {"features": np.arange(6, dtype=np.float16).reshape(2, 3), "norm_bb": np.ones((2, 6), np.float16)}
    raw = msgpack.packb({**{k: msgpack_numpy.encode(a) for k, a in arrays.items()}, "scale": 0.5,
                         "tag": msgpack.ExtType(1, b"x")}, use_bin_type=True)
    out = decode_img_dump(raw, False, ("features", "norm_bb"))
    assert all(np.array_equal(out[k], arrays[k]) for k in arrays)


def test_remembered_layouts_only_serve_identical_headers():
    """Values of equal length whose headers differ (shape, dtype) each decode as written;
    a second read of a value comes from the remembered layout and is equal."""
    from data.feature_codec import decode_img_dump
    variants = [np.arange(24, dtype=np.float16).reshape(4, 6), np.arange(24, dtype=np.float16).reshape(6, 4),
                np.arange(24, dtype=np.int16).reshape(4, 6), np.arange(24, dtype=np.float16)[::-1].reshape(4, 6)]
    bb = np.ones((2, 6), np.float16)
    raws = [msgpack.packb({"features": msgpack_numpy.encode(a), "norm_bb": msgpack_numpy.encode(bb)},
                          use_bin_type=True) for a in variants]
    assert len({len(r) for r in raws}) == 1
    for _ in range(2):
        for raw, a in zip(raws, variants):
            out = decode_img_dump(raw, False, ("features", "norm_bb"))
            assert out["features"].dtype == a.dtype and np.array_equal(out["features"], a)
            assert np.array_equal(out["norm_bb"], bb)
            assert np.shares_memory(out["features"], np.frombuffer(raw, np.uint8))
    from data.feature_codec import _LAYOUTS
    served = _LAYOUTS.read(memoryview(raws[3]), ("features", "norm_bb"))  # same header as raws[0]
    assert served is not None and np.array_equal(served["features"], variants[3])


def test_recycled_buffers_never_overwrite_a_batch_in_use():
    from data.batch import RecycledBuffers
    pool = RecycledBuffers(keep=2)
    first = torch.from_numpy(pool.empty((4, 8), np.float16))
    first.fill_(1)
    view_of_second = pool.empty((4, 8), np.float16)[1:]  # only a view survives
    view_of_second.fill(2)
    third = pool.empty((4, 8), np.float16)  # both slots taken: fresh memory
    third.fill(3)
    assert (first == 1).all() and (view_of_second == 2).all()
    address = first.data_ptr()
    del first
    reused = pool.empty((2, 8), np.float16)
    assert reused.ctypes.data == address  # released memory is used again


def test_text_side_batches_stay_intact_while_held(txt_db, img_db):
    random.seed(0)
    ds = ItmRankDatasetHardNegFromText(txt_db, img_db, 3)
    random.seed(1)
    kept = ds[0]
    copy = {k: v.clone() for k, v in kept.items() if torch.is_tensor(v)}
    for i in range(1, 5):
        ds[i]
    assert all(torch.equal(kept[k], v) for k, v in copy.items())
    random.seed(1)
    again = ds[0]
    assert all(torch.equal(again[k], v) for k, v in copy.items())


def test_prefetch_loader_passes_batches_through_on_cpu(txt_db, img_db):
    from torch.utils.data import DataLoader
    from data import PrefetchLoader, itm_eval_collate
    ds = ItmEvalDataset(txt_db, img_db, 8)
    loader = PrefetchLoader(DataLoader(ds, batch_size=1, collate_fn=itm_eval_collate), "cpu")
    assert len(loader) == len(ds) and loader.dataset is ds
    first = next(iter(loader))
    assert torch.equal(first[0]["img_feat"], ds[0][0]["img_feat"])


def test_resumable_stream_continues_where_it_stopped(txt_db, img_db):
    """The position saved mid-epoch gives the same following batches, negatives included."""
    from data import ResumableStream, itm_rank_hn_collate
    ds = ItmRankDatasetHardNegFromText(txt_db, img_db, 3)
    a = ResumableStream(ds, itm_rank_hn_collate, seed=5)
    for _ in range(70):  # crosses the epoch boundary (60 captions)
        next(a)
    state = a.state_dict()
    expected = [next(a)["img_feat"] for _ in range(5)]
    b = ResumableStream(ds, itm_rank_hn_collate, seed=5)
    b.load_state_dict(state)
    assert state == {"epoch": 1, "pos": 10}
    for e in expected:
        assert torch.equal(next(b)["img_feat"], e)


def _stream_batches(ds, n, **kwargs):
    from data import ResumableStream, itm_rank_hn_collate
    stream = ResumableStream(ds, itm_rank_hn_collate, seed=5, **kwargs)
    return [{k: v.clone() for k, v in next(stream).items()} for _ in range(n)], stream.state_dict()


@pytest.mark.parametrize("iais", [False, True], ids=["compact", "iais"])
def test_stream_batches_do_not_depend_on_the_workers(txt_db, img_db, iais):
    """In the training loop, in 3 threads or in 2 processes: the same batches, negatives
    included, in the same order, across an epoch boundary (60 captions)."""
    ds = ItmRankDatasetHardNegFromText(txt_db, img_db, 7, IAIS=iais)
    random.seed(123)
    before = random.getstate()
    inline, state = _stream_batches(ds, 65)
    assert random.getstate() == before  # the global generator is left alone
    for kwargs in ({"n_workers": 3, "worker_type": "thread"}, {"n_workers": 2, "worker_type": "process"}):
        batches, other_state = _stream_batches(ds, 65, **kwargs)
        assert other_state == state == {"epoch": 1, "pos": 5}
        for a, b in zip(inline, batches):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kwargs


def test_seeded_draws_equal_the_global_generator_seeded_alike():
    from data.negatives import sample_negative, seeded_draws
    pool = list(range(1000))
    random.seed("7:0:3")
    expected = sample_negative(pool, [5], 20)
    random.seed(0)
    with seeded_draws("7:0:3"):
        assert sample_negative(pool, [5], 20) == expected
    assert sample_negative(pool, [5], 20) == random.Random(0).sample(pool, 20)  # global again outside


def test_thread_loader_order_errors_and_eval_batches(txt_db, img_db):
    from data import ThreadLoader, itm_eval_collate, make_loader

    class Slow:
        def __len__(self):
            return 12

        def __getitem__(self, i):
            import time
            time.sleep(0.02 * ((7 * i) % 5))  # later items often finish first
            if i == 9:
                raise DataError("item 9 is broken")
            return torch.tensor([i])

    got = []
    with pytest.raises(DataError, match="item 9 is broken"):
        for batch in ThreadLoader(Slow(), range(12), None, n_threads=4):
            got.append(int(batch))
    assert got == list(range(9))
    ds = ItmEvalDataset(txt_db, img_db, 8)
    inline = list(make_loader(ds, itm_eval_collate, 0))
    assert len(inline) == len(ds)
    for kind in ("thread", "process"):
        other = list(make_loader(ds, itm_eval_collate, 2, worker_type=kind))
        assert len(other) == len(inline)
        for a, b in zip(other, inline):
            for x, y in zip(a, b):
                assert all(torch.equal(x[k], y[k]) for k in x), kind


def test_eval_image_sides_are_built_once_and_marked(txt_db, img_db):
    """Every caption's mini-batch j holds the same image tensors, equal to a fresh build."""
    from data.batch import is_shared_across_batches
    ds = ItmEvalDataset(txt_db, img_db, 8)
    first, second = ds[0], ds[5]
    assert len(first) == 2  # 12 images in mini-batches of 8
    for j, (a, b) in enumerate(zip(first, second)):
        for k in ("img_feat", "img_pos_feat"):
            assert a[k] is b[k] and is_shared_across_batches(a[k])
        fresh = ds.get_batch(5, ds.all_img_ids[8 * j:8 * j + 8])
        assert fresh.keys() == b.keys() and all(torch.equal(fresh[k], b[k]) for k in b)
        assert not is_shared_across_batches(fresh["img_feat"])
    text_side = [v for k, v in first[0].items() if k not in ("img_feat", "img_pos_feat")]
    assert not any(map(is_shared_across_batches, text_side))


def test_shared_tensors_move_to_the_device_once():
    from data.batch import shared_across_batches
    from data.loader import _Uploader
    upload = _Uploader(torch.device("meta"))  # a device whose copies are new objects, on any machine
    shared, own = shared_across_batches(torch.ones(4)), torch.ones(4)
    a, b = upload({"x": shared, "y": own}), upload([shared, own])
    assert a["x"] is b[0] and a["x"].device.type == "meta"
    assert a["y"] is not b[1] and b[1].device.type == "meta"


def test_pinning_threads_use_the_ranks_device(monkeypatch):
    """Loader threads pin on the device of the rank that started them (CUDA's current
    device is per thread), checked with CUDA calls recorded instead of made."""
    import threading
    from data import ThreadLoader
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set", d, threading.get_ident())))
    monkeypatch.setattr(torch.Tensor, "pin_memory",
                        lambda t: calls.append(("pin", None, threading.get_ident())) or t.clone())
    from data.batch import shared_across_batches
    shared = shared_across_batches(torch.tensor([-1]))
    batches = list(ThreadLoader([(torch.tensor([i]), shared) for i in range(6)], range(6), None, 2,
                                pin_memory=True))
    assert [int(b[0]) for b in batches] == list(range(6))
    assert all(b[1] is shared for b in batches)  # moved to the device once, never pinned
    set_in = {tid for op, d, tid in calls if op == "set" and d == 3}
    pinned_in = {tid for op, _, tid in calls if op == "pin"}
    assert pinned_in and pinned_in <= set_in and threading.get_ident() not in set_in
    assert all(calls[[c[2] for c in calls].index(tid)][0] == "set" for tid in pinned_in)  # set before pinning


def test_recycled_buffers_shared_by_threads_hand_out_each_buffer_once():
    import threading
    from data.batch import RecycledBuffers
    pool = RecycledBuffers(keep=4)
    errors, start, all_holding = [], threading.Barrier(6), threading.Barrier(6)

    def work(tag):
        start.wait()
        first = pool.empty((64, 256), np.int32)
        first.fill(tag)
        all_holding.wait()  # six buffers in use at once: the pool keeps 4, two are fresh arrays
        if not (first == tag).all():
            errors.append(tag)
        del first
        for _ in range(200):
            held = pool.empty((64, 256), np.int32)
            held.fill(tag)
            if not (held == tag).all():
                errors.append(tag)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, or a race would rarely show
    try:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == [] and len(pool._buffers) == 4


def test_each_thread_reads_through_its_own_transaction(txt_db, img_db):
    import threading
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


def test_layout_masks_and_gather_index_by_hand():
    """Masks and gather index against a position-by-position construction."""
    from data.batch import compact_attn_masks, get_gather_index, padded_layout_masks
    txt_lens, num_bbs = [5, 3, 7, 4], [2, 6, 1, 3]
    max_tl, max_nbb, box_start = 7, 6, 4
    width = max(txt_lens) + max(num_bbs)
    compact = [[int(j < tl + nbb) for j in range(width)] for tl, nbb in zip(txt_lens, num_bbs)]
    gather = [[box_start + j - tl if tl <= j < tl + nbb else j for j in range(width)]
              for tl, nbb in zip(txt_lens, num_bbs)]
    attn = [[int(j < tl or max_tl <= j < max_tl + nbb) for j in range(max_tl + max_nbb)]
            for tl, nbb in zip(txt_lens, num_bbs)]
    words = [[int(1 <= j < tl - 1) for j in range(max_tl + max_nbb)] for tl in txt_lens]
    boxes = [[int(max_tl <= j < max_tl + nbb) for j in range(max_tl + max_nbb)] for nbb in num_bbs]
    assert compact_attn_masks(txt_lens, num_bbs).tolist() == compact
    assert get_gather_index(txt_lens, num_bbs, 4, box_start, width).tolist() == gather
    assert [m.tolist() for m in padded_layout_masks(txt_lens, num_bbs)] == [attn, words, boxes]


def test_pair_batch_is_the_one_image_validation_batch(txt_db, img_db):
    """Caption i with its own image: the IAIS validation batch against that image alone,
    with the caption's word count (no [CLS]/[SEP]) and the image's box count."""
    hard = ItmRankDatasetHardNegFromText(txt_db, img_db, 3)
    val = ItmValDataset(txt_db, img_db, 1, IAIS=True)
    for i in (0, 17, len(val) - 1):
        txt_id, batch, n_words, n_boxes = hard.pair_batch(i)
        ref = val[i]
        assert txt_id == val.ids[i]
        assert batch.keys() == ref.keys() and all(
            batch[k].dtype == ref[k].dtype and torch.equal(batch[k], ref[k]) for k in ref)
        assert n_words == len(txt_db[txt_id]["input_ids"]) == int(batch["txt_attn_masks"].sum())
        assert n_boxes == img_db.name2nbb[txt_db.txt2img[txt_id]] == int(batch["img_attn_masks"].sum())


def test_only_training_datasets_carry_lens(txt_db, img_db):
    ds = ItmRankDatasetHardNegFromImage(txt_db, img_db, 7, rank=1, world_size=2)
    assert ds.lens == [len(txt_db[t]["input_ids"]) + img_db.name2nbb[txt_db.txt2img[t]] for t in ds.ids]
    assert not hasattr(ItmValDataset(txt_db, img_db, 5), "lens")


def test_rank_outside_the_world_is_refused(txt_db, img_db):
    with pytest.raises(ValueError, match="rank 2 is not one of the 2 processes"):
        ItmEvalDataset(txt_db, img_db, 8, rank=2, world_size=2)


def test_one_collate_for_every_dataset(txt_db, img_db):
    from data import itm_eval_collate, itm_rank_hn_collate, itm_val_collate
    assert itm_rank_hn_collate is itm_val_collate is itm_eval_collate
    batch = ItmValDataset(txt_db, img_db, 5)[0]
    assert itm_val_collate([batch]) is batch
    with pytest.raises(AssertionError, match="batch_size=1"):
        itm_val_collate([batch, batch])
