"""Captions tokenised into txt_db values (prepro_itm.py, prepro_winoground.py): the tokenizer's
flags, BERT's WordPiece tokenizer of a local vocab file, a txt_db's meta.json and a caption's
value, and the share of [UNK] among a set of captions' tokens."""
import hashlib
import re
import sys
from os.path import basename, isdir, isfile

from data import DataError
from data.txt_db import KNOWN_VOCAB_SIZES
from utils.config import ConfigError


def add_tokenizer_args(parser):
    """--vocab (required), --toker and --uncased."""
    a = parser.add_argument
    a("--vocab", required=True,
      help="BERT WordPiece vocab file (e.g. bert-base-cased-vocab.txt)")
    a("--toker", default="bert-base-cased", help="tokenizer name stored in meta.json")
    a("--uncased", action="store_true", help="lower-case captions (uncased vocabularies)")


def check_vocab_file(path):
    """A vocab file is UTF-8 text, one WordPiece token a line."""
    if not isfile(path):
        raise DataError(f"--vocab {path} is {'a folder' if isdir(path) else 'not found'}; pass the WordPiece "
                        f"vocab file (bert-base-cased-vocab.txt)")
    try:
        with open(path, encoding="utf-8") as f:
            f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"--vocab {path} is not UTF-8 text (byte {e.start}); pass the WordPiece vocab file "
                        f"(bert-base-cased-vocab.txt), one token a line") from None


def load_tokenizer(opts):
    """The WordPiece tokenizer of the add_tokenizer_args flags."""
    check_vocab_file(opts.vocab)
    try:
        from pytorch_pretrained_bert import BertTokenizer
    except ImportError:
        raise ConfigError("the tokenizer package is missing: pip install -r requirements.txt") from None
    return BertTokenizer(opts.vocab, do_lower_case=opts.uncased)


def build_meta(tokenizer, toker_name, vocab_path):
    vocab = tokenizer.vocab
    lacking = [k for k in ("UNK", "CLS", "SEP", "MASK") if f"[{k}]" not in vocab]
    if lacking:
        raise DataError(f"--vocab {vocab_path} has no [{lacking[0]}] token; pass a BERT WordPiece vocab file")
    expected = KNOWN_VOCAB_SIZES.get(toker_name)
    if expected is not None and expected != len(vocab):  # meta.json would name another tokenizer
        print(f"WARNING: --vocab {vocab_path} has {len(vocab)} tokens but --toker {toker_name} has {expected}; "
              f"meta.json records toker {toker_name!r}: pass the --toker this vocab belongs to", file=sys.stderr)
    ids = {k: vocab[f"[{k}]"] for k in ("UNK", "CLS", "SEP", "MASK")}
    first_word = next(i for tok, i in sorted(vocab.items(), key=lambda kv: kv[1])
                      if i > ids["MASK"] and not re.fullmatch(r"\[.*\]", tok))
    return {**ids, "v_range": [first_word, len(vocab)], "toker": toker_name, "vocab": basename(vocab_path),
            "vocab_sha256": file_sha256(vocab_path)}


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unk_share(token_lists, unk_id):
    """(tokens that are [UNK], all tokens) of the captions' token id lists."""
    unknown = total = 0
    for ids in token_lists:
        unknown += sum(1 for i in ids if i == unk_id)
        total += len(ids)
    return unknown, total


def check_unk_share(unknown, total, vocab_path, allow, limit):
    """One line naming the vocab file and the share of [UNK] tokens; above ``limit`` (a
    fraction) a DataError unless ``allow``: the vocabulary does not fit the captions."""
    share = unknown / total if total else 0.0
    line = f"--vocab {vocab_path}: {unknown} of {total} tokens ({share:.2%}) are [UNK]"
    if share > limit and not allow:
        raise DataError(f"{line}, more than {limit:.0%}: the vocabulary does not fit the captions (a cased "
                        f"vocab for cased text: bert-base-cased-vocab.txt, `bash scripts/download_itm.sh --only "
                        f"vocab STORAGE`; --uncased for an uncased one); --allow_unk writes the DBs anyway")
    return line


def refuse_wrapped(value, meta, what):
    """A caption whose tokens already hold [CLS] or [SEP] (text written with them) would be
    wrapped a second time at load: refused, naming the caption."""
    for name in ("CLS", "SEP"):
        if meta[name] in value["input_ids"]:
            raise DataError(f"caption of {what} already holds [{name}] (token id {meta[name]}): captions are stored "
                            f"without [CLS]/[SEP], which are added at load; remove them from the text")


def caption_value(tokenizer, raw, txt_id, img_fname):
    """A txt_db value: the caption's WordPiece ids and the name of its image."""
    ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(raw))
    return {"input_ids": ids, "img_fname": img_fname, "raw": raw, "id": txt_id}
