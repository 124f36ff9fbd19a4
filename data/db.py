"""The on-disk formats of the UNITER/IAIS release: text DBs and image-feature DBs.

txt_db: LMDB of lz4(msgpack({'input_ids', 'img_fname', ...})) plus JSON indexes.
img_db: LMDB of msgpack-numpy maps (plain) or .npz bytes (compressed) of float16 arrays,
in a sub-directory named after the box-selection settings.
Every read and write of these formats lives here.
"""
import contextlib
import io
import json
import os
import struct
import threading
from os.path import exists, isdir, join

import lmdb
import lz4.frame
import msgpack
import numpy as np
import torch

IMG_DB_KEYS = "__keys__"


class DataError(ValueError):
    """Bad or missing input data; the message names the file or key at fault."""


def _load_json(path):
    if not exists(path):
        raise DataError(f"{path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def _load_json_map(path, value_type, what):
    """A JSON object whose values are all ``value_type`` (``what`` names them in the error)."""
    obj = _load_json(path)
    if not isinstance(obj, dict) or not all(isinstance(v, value_type) and not isinstance(v, bool)
                                            for v in obj.values()):
        raise DataError(f"{path} must be a JSON object mapping names to {what}; rebuild it")
    return obj


def _processes_on_this_node():
    for var in ("LOCAL_WORLD_SIZE", "HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def open_readonly(path):
    """Open an LMDB for reading without creating or locking anything, so that it works
    on read-only media; read-ahead only when one process per node reads it."""
    if not isdir(path) or not exists(join(path, "data.mdb")):
        raise DataError(f"{path} is not an LMDB directory (no data.mdb)")
    try:
        env = lmdb.open(path, readonly=True, create=False, lock=False, subdir=True,
                        readahead=_processes_on_this_node() == 1, max_readers=1024)
        _check_complete(env, path)
    except lmdb.Error as e:
        raise lmdb_error(path, e) from None
    return env


def _check_complete(env, path):
    """LMDB maps data.mdb into memory: a page past the end of a truncated file kills the
    reader with SIGBUS instead of raising, so the file must hold every page the
    environment's newest meta page counts."""
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = os.path.getsize(join(path, "data.mdb"))
    if size < needed:
        env.close()
        raise DataError(f"{path}/data.mdb is truncated ({size} bytes, the LMDB needs {needed}); "
                        f"copy or download it again")


def lmdb_error(path, error):
    """A DataError naming the LMDB that a raw lmdb.Error came from."""
    return DataError(f"{path}/data.mdb is not a readable LMDB ({type(error).__name__}: "
                     f"{str(error).strip() or 'no detail'}); copy or download it again")


_ENVS = {}  # real path -> environment: py-lmdb allows one per file and process
_ENVS_LOCK = threading.Lock()


class ReadOnlyLmdb:
    """Read transactions of one LMDB, one per process and thread. DataLoader worker
    processes either fork (the lock-free read-only environment is inherited and stays
    valid; only transactions must not cross the fork) or unpickle the dataset (the
    environment is opened there); loader threads each read through their own transaction,
    as LMDB asks, and the values they get stay valid while the thread's transaction lives."""

    def __init__(self, path):
        self.path = path
        self._txns = {}
        self._txn()

    def _txn(self):
        key = (os.getpid(), threading.get_ident())
        txn = self._txns.get(key)
        if txn is None:
            env_key = os.path.realpath(self.path)
            with _ENVS_LOCK:
                if env_key not in _ENVS:
                    _ENVS[env_key] = open_readonly(self.path)
            txn = self._txns[key] = _ENVS[env_key].begin(buffers=True)
        return txn

    def get(self, key):
        try:
            return self._txn().get(key)
        except lmdb.Error as e:
            raise lmdb_error(self.path, e) from None

    def items(self):
        """(key, value) of every entry, as buffers."""
        try:
            yield from self._txn().cursor()
        except lmdb.Error as e:
            raise lmdb_error(self.path, e) from None

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


class _WriteTxn:
    """Writes to a new LMDB, committing every ``every`` puts so transactions stay small."""

    def __init__(self, path, every):
        os.makedirs(path, exist_ok=True)
        self.path = path
        with self._named_errors():
            self.env = lmdb.open(path, readonly=False, create=True, map_size=1 << 40)
            self.txn = self.env.begin(write=True)
        self.every, self.pending = every, 0

    @contextlib.contextmanager
    def _named_errors(self):
        try:
            yield
        except lmdb.Error as e:
            raise DataError(f"could not write the LMDB {self.path} ({type(e).__name__}: "
                            f"{str(e).strip() or 'no detail'}); check its disk space and permissions") from None

    def put(self, key, value):
        with self._named_errors():
            self.txn.put(key.encode("utf-8"), value)
            self.pending += 1
            if self.pending >= self.every:
                self.txn.commit()
                self.txn = self.env.begin(write=True)
                self.pending = 0

    def commit(self):
        with self._named_errors():
            self.txn.commit()
            self.env.close()

    def abort(self):
        self.txn.abort()
        self.env.close()


# ----------------------------------------------------------------------------- text DB

def encode_txt(value):
    return lz4.frame.compress(msgpack.packb(value, use_bin_type=True))


def decode_txt(raw):
    return msgpack.unpackb(lz4.frame.decompress(raw), raw=False)


class TxtLmdb:
    """Key -> dict store of a txt_db; opened for writing with readonly=False."""

    def __init__(self, db_dir, readonly=True):
        self.db_dir = db_dir
        self.readonly = readonly
        if readonly:
            self.txn, self._writer = ReadOnlyLmdb(db_dir), None
        else:
            self._writer = _WriteTxn(db_dir, every=1000)

    def __getitem__(self, key):
        raw = self.txn.get(key.encode("utf-8"))
        if raw is None:
            raise DataError(f"{self.db_dir}: text id {key!r} not in the LMDB")
        try:
            return decode_txt(bytes(raw))
        except Exception as e:
            raise DataError(f"{self.db_dir}: corrupt value for key {key!r} ({e})") from None

    def items(self):
        """(text id, decoded value) of every entry, in key order."""
        for key, raw in self.txn.items():
            key = bytes(key).decode("utf-8")
            try:
                yield key, decode_txt(raw)
            except Exception as e:
                raise DataError(f"{self.db_dir}: corrupt value for key {key!r} ({e})") from None

    def __setitem__(self, key, value):
        if self.readonly:
            raise DataError(f"{self.db_dir} is opened read-only")
        self._writer.put(key, encode_txt(value))

    def close(self):
        if self._writer is not None:
            self._writer.commit()
            self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TxtTokLmdb:
    """A tokenised caption split: ids filtered by ``max_txt_len`` (-1 keeps all)."""

    def __init__(self, db_dir, max_txt_len=60):
        if not isdir(db_dir):
            raise DataError(f"txt_db {db_dir} not found")
        id2len = _load_json_map(join(db_dir, "id2len.json"), int, "caption lengths")
        self.id2len = (id2len if max_txt_len == -1 else
                       {id_: n for id_, n in id2len.items() if n <= max_txt_len})
        self.db_dir = db_dir
        self.db = TxtLmdb(db_dir, readonly=True)
        meta = _load_json(join(db_dir, "meta.json"))
        for key in ("CLS", "SEP", "MASK"):
            if not isinstance(meta, dict) or not isinstance(meta.get(key), int) or isinstance(meta[key], bool):
                raise DataError(f"{db_dir}/meta.json: {key} must be a token id (an integer); rebuild the txt_db")
        self.cls_, self.sep, self.mask = meta["CLS"], meta["SEP"], meta["MASK"]
        self.v_range = meta.get("v_range")
        self._txt2img = self._img2txts = None
        self._links_checked = False

    def __getitem__(self, id_):
        return self.db[id_]

    def combine_inputs(self, *inputs):
        """[CLS] ids [SEP] (ids [SEP] ...) as a LongTensor."""
        input_ids = [self.cls_]
        for ids in inputs:
            input_ids.extend(list(ids) + [self.sep])
        return torch.tensor(input_ids)

    def check_links(self):
        """Every caption's image lists the caption back, and every listed caption points
        to that image (checked once per DB object)."""
        if self._links_checked:
            return
        txt2img, img2txts, listed = self.txt2img, self.img2txts, {}
        for img, txts in img2txts.items():
            for txt in txts:
                listed[txt] = img
                if txt2img.get(txt) != img:
                    raise DataError(f"{self.db_dir}: img2txts.json lists {txt!r} under {img!r} but txt2img.json "
                                    f"gives {txt2img.get(txt)!r}; rebuild the txt_db")
        for txt in self.id2len:
            if txt not in txt2img or listed.get(txt) != txt2img[txt]:
                where = ("not in txt2img.json" if txt not in txt2img else
                         f"not listed under its image {txt2img[txt]!r} in img2txts.json")
                raise DataError(f"{self.db_dir}: text id {txt!r} of id2len.json is {where}; rebuild the txt_db")
        self._links_checked = True

    @property
    def txt2img(self):
        if self._txt2img is None:
            self._txt2img = _load_json_map(join(self.db_dir, "txt2img.json"), str, "image file names")
        return self._txt2img

    @property
    def img2txts(self):
        if self._img2txts is None:
            self._img2txts = _load_json_map(join(self.db_dir, "img2txts.json"), list, "lists of text ids")
        return self._img2txts


def write_txt_db(db_dir, examples, meta):
    """Write a txt_db from ``{text_id: {'input_ids', 'img_fname', ...}}`` in order."""
    if exists(join(db_dir, "data.mdb")):
        raise DataError(f"{db_dir} already holds an LMDB; remove it or choose another output")
    id2len, txt2img, img2txts = {}, {}, {}
    with TxtLmdb(db_dir, readonly=False) as db:
        for id_, ex in examples.items():
            db[id_] = ex
            id2len[id_] = len(ex["input_ids"])
            txt2img[id_] = ex["img_fname"]
            img2txts.setdefault(ex["img_fname"], []).append(id_)
    for name, obj in (("id2len", id2len), ("txt2img", txt2img), ("img2txts", img2txts), ("meta", meta)):
        with open(join(db_dir, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(obj, f)


# ----------------------------------------------------------------------------- image DB

def compute_num_bb(conf, conf_th, min_bb, max_bb):
    """Boxes kept for an image: those above conf_th, clipped to [min_bb, max_bb]."""
    return int(min(max_bb, max(min_bb, int((np.asarray(conf) > conf_th).sum()))))


def img_db_names(conf_th, max_bb, min_bb, num_bb, compress):
    """(LMDB sub-directory, count file) of a box-selection setting."""
    if conf_th == -1:
        db_name, nbb_file = f"feat_numbb{num_bb}", None
    else:
        db_name = f"feat_th{conf_th}_max{max_bb}_min{min_bb}"
        nbb_file = f"nbb_th{conf_th}_max{max_bb}_min{min_bb}.json"
    return db_name + ("_compressed" if compress else ""), nbb_file


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


class DetectFeatLmdb:
    """Region features of one image set. ``img_db[fname] -> (features, norm_bb)``:
    features [nbb, 2048] in their stored float16, norm_bb [nbb, 6] float32."""

    def __init__(self, img_dir, conf_th=0.2, max_bb=100, min_bb=10, num_bb=36, compress=True):
        if not isdir(img_dir):
            raise DataError(f"img_db {img_dir} not found")
        self.img_dir, self.conf_th, self.max_bb, self.min_bb = img_dir, conf_th, max_bb, min_bb
        self.compress = compress
        db_name, nbb_file = img_db_names(conf_th, max_bb, min_bb, num_bb, compress)
        if conf_th == -1:
            name2nbb = None
        elif exists(join(img_dir, nbb_file)):
            name2nbb = _load_json_map(join(img_dir, nbb_file), int, "box counts")
        else:
            name2nbb = None
            fallback = "all_compressed" if compress else "all"
            if exists(join(img_dir, fallback)):
                db_name = fallback
                if not compress:
                    name2nbb = _load_json_map(join(img_dir, "nbb.json"), int, "box counts")
        if not exists(join(img_dir, db_name)):
            present = sorted(d for d in os.listdir(img_dir) if isdir(join(img_dir, d)))
            raise DataError(f"{img_dir} has no {db_name}/ for conf_th={conf_th} max_bb={max_bb} "
                            f"min_bb={min_bb} num_bb={num_bb} compressed={compress} "
                            f"(found: {', '.join(present) or 'nothing'})")
        self.db_dir = join(img_dir, db_name)
        self.txn = ReadOnlyLmdb(self.db_dir)
        self._finite = set()  # images whose features and boxes were found finite
        if conf_th == -1:
            self.name2nbb = {name: num_bb for name in self.keys()}
        else:
            self.name2nbb = name2nbb if name2nbb is not None else self._compute_nbb()

    def keys(self):
        raw = self.txn.get(IMG_DB_KEYS.encode())
        if raw is not None:
            return json.loads(bytes(raw).decode("utf-8"))
        return [bytes(k).decode("utf-8") for k, _ in self.txn.items() if bytes(k) != IMG_DB_KEYS.encode()]

    def _compute_nbb(self):
        return {name: compute_num_bb(self.read_arrays(name, ("conf",), cut=False)["conf"],
                                     self.conf_th, self.min_bb, self.max_bb)
                for name in self.keys()}

    def read_arrays(self, fname, keys=("features", "norm_bb"), cut=True):
        """Named arrays of one image, cut to its box count unless cut=False."""
        raw = self.txn.get(fname.encode("utf-8"))
        if raw is None:
            raise DataError(f"{self.db_dir}: image {fname!r} not in the LMDB")
        try:
            arrays = decode_img_dump(raw, self.compress, keys)
        except Exception as e:
            raise DataError(f"{self.db_dir}: corrupt value for key {fname!r} ({type(e).__name__}: {e})") from None
        if fname not in self._finite:
            self._check_finite(fname, arrays)
        if cut:
            nbb = self.name2nbb[fname]
            arrays = {k: a[:nbb] for k, a in arrays.items()}
        return arrays

    def _check_finite(self, fname, arrays):
        """Non-finite features or boxes give NaN scores and gradients far from their cause:
        each image is checked the first time this process reads its features."""
        checked = [k for k in ("features", "norm_bb") if k in arrays]
        for key in checked:
            if not np.isfinite(arrays[key]).all():
                raise DataError(f"{self.db_dir}: image {fname!r} has non-finite values in {key}; "
                                f"rebuild its features or drop it from the txt_db")
        if len(checked) == 2:
            self._finite.add(fname)

    def __getitem__(self, fname):
        arrays = self.read_arrays(fname)
        feat = torch.from_numpy(np.array(arrays["features"]))
        norm_bb = torch.from_numpy(arrays["norm_bb"].astype(np.float32))
        return feat, norm_bb


class ImageLmdbGroup:
    """Opens each img_db once, however many splits use it."""

    def __init__(self, conf_th, max_bb, min_bb, num_bb, compress):
        self.settings = (conf_th, max_bb, min_bb, num_bb, compress)
        self.path2imgdb = {}

    def __getitem__(self, path):
        key = os.path.normpath(path)
        if key not in self.path2imgdb:
            self.path2imgdb[key] = DetectFeatLmdb(path, *self.settings)
        return self.path2imgdb[key]


class ImgDbWriter:
    """Writes an img_db in the release layout: LMDB values plus ``__keys__`` and the
    box-count JSON of the chosen setting."""

    def __init__(self, img_dir, conf_th=0.2, max_bb=100, min_bb=10, num_bb=36, compress=False,
                 keep_all=False):
        self.img_dir, self.compress = img_dir, compress
        self.conf_th, self.max_bb, self.min_bb, self.num_bb = conf_th, max_bb, min_bb, num_bb
        if keep_all:  # every box, counts in nbb.json (the 'all' sub-DB)
            db_name, self.nbb_file = "all" + ("_compressed" if compress else ""), "nbb.json"
        else:
            db_name, self.nbb_file = img_db_names(conf_th, max_bb, min_bb, num_bb, compress)
        self.db_dir = join(img_dir, db_name)
        if exists(join(self.db_dir, "data.mdb")):
            raise DataError(f"{self.db_dir} already exists; remove it or choose another output")
        self._writer = _WriteTxn(self.db_dir, every=500)
        self.name2nbb = {}

    def box_count(self, conf):
        """Boxes kept under the writer's setting for an image with these confidences."""
        if self.conf_th == -1:
            return min(self.num_bb, len(conf))
        return compute_num_bb(conf, self.conf_th, self.min_bb, self.max_bb)

    def put(self, fname, arrays, nbb=None):
        """arrays: features/norm_bb/conf/soft_labels (stored as float16); nbb defaults to
        the count implied by ``conf`` and the writer's setting."""
        arrays = {k: np.asarray(a, dtype=np.float16) for k, a in arrays.items()}
        if nbb is None:
            nbb = self.box_count(arrays["conf"])
        self._writer.put(fname, encode_img_dump(arrays, self.compress))
        self.name2nbb[fname] = int(nbb)

    def close(self):
        self._writer.put(IMG_DB_KEYS, json.dumps(list(self.name2nbb)).encode("utf-8"))
        self._writer.commit()
        if self.nbb_file:
            with open(join(self.img_dir, self.nbb_file), "w", encoding="utf-8") as f:
                json.dump(self.name2nbb, f)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self._writer.abort()
