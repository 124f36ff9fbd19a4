"""The txt_db format: an LMDB of lz4(msgpack({'input_ids', 'img_fname', ...})) per text id,
with the JSON indexes id2len, txt2img, img2txts and meta beside it.

This module owns the format's contract (README "What is checked"): the JSON files' types
(read_meta, TxtTokLmdb), the links between them (TxtTokLmdb.check_links), captions that
already hold [CLS]/[SEP] (refused as they are decoded), and the tokenizer recorded in
meta.json against the model's vocabulary (TxtTokLmdb.check_vocab). The scan of every
caption's token ids and lengths is engine/checks.py's."""
import logging
from os.path import exists, isdir, join

import lz4.frame
import msgpack
import torch

from utils.outputs import write_json

from .errors import DataError, load_json, load_json_map
from .lmdb_io import ReadOnlyLmdb, WriteTxn

LOGGER = logging.getLogger("iais")
TXT_DB_INDEXES = ("id2len", "txt2img", "img2txts", "meta")  # the JSON files beside the LMDB
TXT_DB_FILES = ("data.mdb", "lock.mdb") + tuple(f"{name}.json" for name in TXT_DB_INDEXES)


def encode_txt(value):
    return lz4.frame.compress(msgpack.packb(value, use_bin_type=True))


def decode_txt(raw):
    return msgpack.unpackb(lz4.frame.decompress(raw), raw=False)


class TxtLmdb:
    """Key -> dict store of a txt_db; opened for writing with readonly=False."""

    def __init__(self, db_dir, readonly=True, check=None):
        self.db_dir = db_dir
        self.readonly = readonly
        self._check = check  # check(key, value) of every decoded value, or None
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
            value = decode_txt(raw)
        except Exception as e:
            raise DataError(f"{self.db_dir}: corrupt value for key {key!r} ({e})") from None
        if self._check is not None:
            self._check(key, value)
        return value

    def items(self):
        """(text id, decoded value) of every entry, in key order."""
        for key, raw in self.txn.items():
            key = bytes(key).decode("utf-8")
            yield key, self._decode(key, raw)

    def __len__(self):
        return self.txn.entries()

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
        negative = next((id_ for id_, n in id2len.items() if n < 0), None)
        if negative is not None:
            raise DataError(f"{db_dir}/id2len.json: text id {negative!r} has length {id2len[negative]}; lengths are "
                            f"token counts (>= 0): rebuild the txt_db")
        self._n_listed = len(id2len)  # before the max_txt_len cut, to tell captions id2len.json leaves out
        self._id2len_all = id2len
        self.id2len = (id2len if max_txt_len == -1 else
                       {id_: n for id_, n in id2len.items() if n <= max_txt_len})
        self.db_dir = db_dir
        self.meta = read_meta(db_dir)
        self.cls_, self.sep, self.mask = self.meta["CLS"], self.meta["SEP"], self.meta["MASK"]
        self.v_range = self.meta.get("v_range")
        self.toker = self.meta.get("toker")
        self.db = TxtLmdb(db_dir, readonly=True, check=self._check_caption)
        self._txt2img = self._img2txts = None
        self._links_checked = False

    def _check_caption(self, txt_id, value):
        """What the caption scan cannot tell of one decoded value: model input is [CLS] +
        input_ids + [SEP], so ids that already hold them would be wrapped twice (training
        and scoring a caption the model is never shown); and a boolean is no token id."""
        ids = value.get("input_ids") if isinstance(value, dict) else None
        if not isinstance(ids, list):
            return  # refused by the caption scan (engine/checks.py), naming the text
        # the scan takes booleans for integers (token 0 or 1); `in` finds them at C speed, as
        # it finds 0 and 1, which real captions never hold
        if (True in ids or False in ids) and any(type(i) is bool for i in ids):
            raise DataError(f"{self.db_dir}: text {txt_id!r} has a boolean among its input_ids, not a token id; "
                            f"rebuild the txt_db")
        if self.cls_ in ids or self.sep in ids:
            name, token = ("CLS", self.cls_) if self.cls_ in ids else ("SEP", self.sep)
            raise DataError(f"{self.db_dir}: text {txt_id!r} already holds the {name} token id {token} of "
                            f"meta.json; input_ids must be the caption's tokens without [CLS]/[SEP] "
                            f"(they are added at load): rebuild the txt_db from the raw captions")

    def check_vocab(self, vocab_size):
        """A WARNING when meta.json's tokenizer or vocabulary size is not the model's: a
        txt_db of another tokenizer gives wrong tokens even where every id fits the table."""
        # v_range, written with the vocabulary, outranks what the tokenizer's name implies
        if isinstance(self.v_range, list):
            size, source = self.v_range[1], f"v_range {self.v_range} ends at {self.v_range[1]}"
        else:
            size = KNOWN_VOCAB_SIZES.get(self.toker)
            source = f"toker {self.toker!r} has {size} tokens"
        problems = [source] if size is not None and size != vocab_size else []
        if problems:
            LOGGER.warning("%s/meta.json: %s but the model's vocab_size is %d: the txt_db was probably made with "
                           "another tokenizer than the model's (bert-base-cased: 28996)", self.db_dir,
                           " and ".join(problems), vocab_size)
        return problems

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
        unlisted = max(len(self.db) - self._n_listed, sum(1 for t in txt2img if t not in self._id2len_all))
        if unlisted > 0:
            LOGGER.warning("%s: id2len.json lists %d captions, its LMDB or txt2img.json %d more: only those of "
                           "id2len.json are used (the results name how many texts and images were scored)",
                           self.db_dir, self._n_listed, unlisted)
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
            img2txts = load_json_map(join(self.db_dir, "img2txts.json"), list, "lists of text ids")
            for img, txts in img2txts.items():
                if not all(isinstance(t, str) for t in txts):
                    raise DataError(f"{self.db_dir}/img2txts.json: image {img!r} lists a text id that is not a "
                                    f"string ({str(txts)[:60]}); rebuild the txt_db")
            self._img2txts = img2txts
        return self._img2txts


# vocabulary sizes of the tokenizers whose names meta.json's 'toker' records
KNOWN_VOCAB_SIZES = {"bert-base-cased": 28996, "bert-large-cased": 28996, "bert-base-uncased": 30522,
                     "bert-large-uncased": 30522, "bert-base-multilingual-cased": 119547}
META_IDS = ("CLS", "SEP", "MASK")


def read_meta(db_dir):
    """meta.json of a txt_db: CLS, SEP and MASK token ids (distinct non-negative integers);
    UNK, v_range [first id, vocab size] and toker (a name) checked when present."""
    path = join(db_dir, "meta.json")
    meta = load_json(path)
    if not isinstance(meta, dict):
        raise DataError(f"{path}: CLS must be a token id, in a JSON object with CLS, SEP and MASK; "
                        f"rebuild the txt_db")
    for key in META_IDS + (("UNK",) if "UNK" in meta else ()):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DataError(f"{path}: {key} must be a token id (an integer >= 0), got {str(value)[:40]}; "
                            f"rebuild the txt_db")
    if len({meta[k] for k in META_IDS}) != len(META_IDS):
        raise DataError(f"{path}: CLS, SEP and MASK must be distinct token ids, got "
                        f"{[meta[k] for k in META_IDS]}; rebuild the txt_db")
    v_range = meta.get("v_range")
    if v_range is not None and not (isinstance(v_range, list) and len(v_range) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in v_range) and 0 <= v_range[0] < v_range[1]):
        raise DataError(f"{path}: v_range must be [first word id, vocab size], got {str(v_range)[:40]}; "
                        f"rebuild the txt_db")
    if "toker" in meta and not isinstance(meta["toker"], str):
        raise DataError(f"{path}: toker must be the tokenizer's name, got {str(meta['toker'])[:40]}")
    return meta


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
