"""The txt_db format: an LMDB of lz4(msgpack({'input_ids', 'img_fname', ...})) per text id,
with the JSON indexes id2len, txt2img, img2txts and meta beside it."""
from os.path import exists, isdir, join

import lz4.frame
import msgpack
import torch

from utils.outputs import write_json

from .errors import DataError, load_json, load_json_map
from .lmdb_io import ReadOnlyLmdb, WriteTxn

TXT_DB_INDEXES = ("id2len", "txt2img", "img2txts", "meta")  # the JSON files beside the LMDB
TXT_DB_FILES = ("data.mdb", "lock.mdb") + tuple(f"{name}.json" for name in TXT_DB_INDEXES)


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
            self._writer = WriteTxn(db_dir, every=1000)

    def __getitem__(self, key):
        raw = self.txn.get(key.encode("utf-8"))
        if raw is None:
            raise DataError(f"{self.db_dir}: text id {key!r} not in the LMDB")
        return self._decode(key, bytes(raw))

    def _decode(self, key, raw):
        try:
            return decode_txt(raw)
        except Exception as e:
            raise DataError(f"{self.db_dir}: corrupt value for key {key!r} ({e})") from None

    def items(self):
        """(text id, decoded value) of every entry, in key order."""
        for key, raw in self.txn.items():
            key = bytes(key).decode("utf-8")
            yield key, self._decode(key, raw)

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
        id2len = load_json_map(join(db_dir, "id2len.json"), int, "caption lengths")
        self.id2len = (id2len if max_txt_len == -1 else
                       {id_: n for id_, n in id2len.items() if n <= max_txt_len})
        self.db_dir = db_dir
        self.db = TxtLmdb(db_dir, readonly=True)
        meta = load_json(join(db_dir, "meta.json"))
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
            self._txt2img = load_json_map(join(self.db_dir, "txt2img.json"), str, "image file names")
        return self._txt2img

    @property
    def img2txts(self):
        if self._img2txts is None:
            self._img2txts = load_json_map(join(self.db_dir, "img2txts.json"), list, "lists of text ids")
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
    for name, obj in zip(TXT_DB_INDEXES, (id2len, txt2img, img2txts, meta)):
        write_json(join(db_dir, f"{name}.json"), obj)
