"""Decoding img_db values in place: the same arrays as msgpack-numpy, whatever the encoding."""
import msgpack
import msgpack_numpy
import numpy as np

from data.feature_codec import _LAYOUTS, decode_img_dump


def test_decoder_equals_msgpack_numpy(img_db):
    """Our plain-value decoder gives exactly what msgpack-numpy decodes, reads the arrays in
    place (views of the stored bytes), and builds only the arrays it is asked for."""
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
    arrays = {"features": np.arange(6, dtype=np.float16).reshape(2, 3), "norm_bb": np.ones((2, 6), np.float16)}
    raw = msgpack.packb({**{k: msgpack_numpy.encode(a) for k, a in arrays.items()}, "scale": 0.5,
                         "tag": msgpack.ExtType(1, b"x")}, use_bin_type=True)
    out = decode_img_dump(raw, False, ("features", "norm_bb"))
    assert all(np.array_equal(out[k], arrays[k]) for k in arrays)


def test_remembered_layouts_only_serve_identical_headers():
    """Values of equal length whose headers differ (shape, dtype) each decode as written;
    a second read of a value comes from the remembered layout and is equal."""
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
    served = _LAYOUTS.read(memoryview(raws[3]), ("features", "norm_bb"))  # same header as raws[0]
    assert served is not None and np.array_equal(served["features"], variants[3])
