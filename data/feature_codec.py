"""Image-feature values of an img_db: encoding, and decoding in place.

A plain value is msgpack of ``{name: {nd, type, kind, shape, data}}`` (msgpack-numpy's
layout); a compressed one is the bytes of an ``.npz``. Plain values are decoded without
copying the arrays' data: the arrays returned are read-only views of the stored bytes."""
import io
import struct

import msgpack
import numpy as np


def _get(d, key):
    """msgpack-numpy maps carry bytes keys when written by current tools, str by older ones."""
    return d[key] if key in d else d[key.encode()]


def _msgpack_array(encoded):
    shape = tuple(_get(encoded, "shape"))
    dtype = _get(encoded, "type")
    dtype = np.dtype(dtype if isinstance(dtype, str) else bytes(dtype).decode())
    return np.frombuffer(_get(encoded, "data"), dtype=dtype).reshape(shape)


class _Unsupported(Exception):
    pass


_FIXED = {0xc0: None, 0xc2: False, 0xc3: True}
_INT = {code: (struct.Struct(fmt).unpack_from, struct.calcsize(fmt)) for code, fmt in
        {0xcc: ">B", 0xcd: ">H", 0xce: ">I", 0xcf: ">Q", 0xd0: ">b", 0xd1: ">h", 0xd2: ">i", 0xd3: ">q"}.items()}
_SIZED = {code: (kind, struct.Struct(fmt).unpack_from, struct.calcsize(fmt)) for code, (kind, fmt) in
          {0xc4: ("bin", ">B"), 0xc5: ("bin", ">H"), 0xc6: ("bin", ">I"), 0xd9: ("str", ">B"),
           0xda: ("str", ">H"), 0xdb: ("str", ">I"), 0xdc: ("array", ">H"), 0xdd: ("array", ">I"),
           0xde: ("map", ">H"), 0xdf: ("map", ">I")}.items()}


def _unpack_view(buf, pos):
    """One msgpack object at ``pos`` -> (object, next position). Handles the subset that
    numpy dumps use (maps, arrays, strings, bins, ints, booleans, nil); a bin comes back as
    a memoryview into ``buf``, so array payloads are never copied."""
    b = buf[pos]
    pos += 1
    if b <= 0x7f:
        return b, pos
    if 0xa0 <= b <= 0xbf:
        n = b & 0x1f
        return str(buf[pos:pos + n], "utf-8"), pos + n
    if b in _SIZED:
        kind, unpack, size = _SIZED[b]
        n = unpack(buf, pos)[0]
        pos += size
    elif b in _FIXED:
        return _FIXED[b], pos
    elif b in _INT:
        unpack, size = _INT[b]
        return unpack(buf, pos)[0], pos + size
    elif b >= 0xe0:
        return b - 0x100, pos
    elif 0x90 <= b <= 0x9f:
        kind, n = "array", b & 0x0f
    elif 0x80 <= b <= 0x8f:
        kind, n = "map", b & 0x0f
    else:
        raise _Unsupported(hex(b))
    if kind == "bin":
        return buf[pos:pos + n], pos + n
    if kind == "str":
        return str(buf[pos:pos + n], "utf-8"), pos + n
    if kind == "array":
        items = []
        for _ in range(n):
            item, pos = _unpack_view(buf, pos)
            items.append(item)
        return items, pos
    mapping = {}
    for _ in range(n):
        key, pos = _unpack_view(buf, pos)
        value, pos = _unpack_view(buf, pos)
        mapping[bytes(key) if isinstance(key, memoryview) else key] = value
    return mapping, pos


def encode_img_dump(arrays, compress):
    """Arrays (features, norm_bb, conf, soft_labels) -> an img_db value."""
    if compress:
        with io.BytesIO() as buf:
            np.savez_compressed(buf, **arrays)
            return buf.getvalue()
    return msgpack.packb({k: {b"nd": True, b"type": a.dtype.str, b"kind": b"", b"shape": list(a.shape),
                              b"data": np.ascontiguousarray(a).tobytes()}
                          for k, a in arrays.items()}, use_bin_type=True)


def decode_img_dump(raw, compress, keys=None):
    """An img_db value -> {name: array} (read-only arrays, float16 as stored).

    ``keys`` limits which arrays are built (compressed values only decompress those). Plain
    values are read in place: the arrays are views of ``raw`` (an LMDB buffer stays valid
    for the life of its read transaction), so nothing but the few header bytes is copied."""
    if compress:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            return {k: npz[k] for k in (keys or npz.files)}
    view = memoryview(raw)
    keys = None if keys is None else tuple(keys)
    arrays = _LAYOUTS.read(view, keys)
    if arrays is not None:
        return arrays
    try:
        dump, end = _unpack_arrays_in_place(view, keys)
    except (_Unsupported, IndexError, struct.error):  # anything unusual: the reference decoder
        dump, end = msgpack.unpackb(raw, raw=False), None
        dump = {k if isinstance(k, str) else k.decode(): v for k, v in dump.items()}
    arrays = {k: _msgpack_array(v) for k, v in dump.items() if keys is None or k in keys}
    if end is not None:
        _LAYOUTS.remember(view, keys, end, dump, arrays)
    return arrays


def _unpack_arrays_in_place(view, keys):
    """The top-level map of a numpy dump, stopping once every wanted entry has been read:
    (entries, where reading stopped)."""
    if not 0x80 <= view[0] <= 0x8f:
        raise _Unsupported("not a small map")
    dump, pos = {}, 1
    for _ in range(view[0] & 0x0f):
        key, pos = _unpack_view(view, pos)
        key = key if isinstance(key, str) else bytes(key).decode()
        value, pos = _unpack_view(view, pos)
        dump[key] = value
        if keys is not None and all(k in dump for k in keys):
            break
    else:
        if pos != len(view):
            raise _Unsupported("trailing bytes")
    return dump, pos


class _DumpLayouts:
    """Where the arrays sit inside plain img_db values, remembered per value length.

    Values of one img_db with the same length nearly always share their header bytes (same
    box count, same fields). The decoder decides every position, dtype and shape from the
    bytes it reads outside the arrays' data, so a value that equals a remembered one in
    all of those bytes has its arrays at the same offsets and is read without decoding."""

    def __init__(self, limit=4096):
        self.limit = limit
        self._layouts = {}

    def read(self, view, keys):
        entry = self._layouts.get((len(view), keys))
        if entry is None:
            return None
        header, arrays = entry
        if not all(view[start:end] == part for start, end, part in header):
            return None
        return {k: np.frombuffer(view, dtype, count, offset).reshape(shape)
                for k, dtype, count, offset, shape in arrays}

    def remember(self, view, keys, end, dump, arrays):
        """``dump``: the entries read up to ``end``; ``arrays``: the ones returned."""
        if len(self._layouts) >= self.limit:
            return
        data = [entry.get("data", entry.get(b"data")) if isinstance(entry, dict) else None
                for entry in dump.values()]
        if not all(isinstance(d, memoryview) for d in data):
            return
        base = np.frombuffer(view, np.uint8).ctypes.data
        spans = sorted((offset, offset + len(d)) for d in data if len(d)
                       for offset in [np.frombuffer(d, np.uint8).ctypes.data - base])
        header, pos = [], 0
        for start, stop in spans + [(end, end)]:
            if start > pos:
                header.append((pos, start, bytes(view[pos:start])))
            pos = max(pos, stop)
        self._layouts[(len(view), keys)] = (header, [(k, a.dtype, a.size, a.ctypes.data - base, a.shape)
                                                     for k, a in arrays.items()])


_LAYOUTS = _DumpLayouts()
