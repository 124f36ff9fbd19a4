"""Captions tokenised into txt_db values (prepro_itm.py, prepro_winoground.py): the tokenizer's
flags, BERT's WordPiece tokenizer of a local vocab file, a txt_db's meta.json and a caption's
value."""
import re

from data import DataError
from utils.config import ConfigError


def add_tokenizer_args(parser, vocab_required=True):
    """--vocab, --toker and --uncased (``vocab_required=False`` leaves the check of --vocab to
    the script)."""
    a = parser.add_argument
    a("--vocab", required=vocab_required, default=None,
      help="BERT WordPiece vocab file (e.g. bert-base-cased-vocab.txt)")
    a("--toker", default="bert-base-cased", help="tokenizer name stored in meta.json")
    a("--uncased", action="store_true", help="lower-case captions (uncased vocabularies)")


def load_tokenizer(opts):
    """The WordPiece tokenizer of the add_tokenizer_args flags."""
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
    ids = {k: vocab[f"[{k}]"] for k in ("UNK", "CLS", "SEP", "MASK")}
    first_word = next(i for tok, i in sorted(vocab.items(), key=lambda kv: kv[1])
                      if i > ids["MASK"] and not re.fullmatch(r"\[.*\]", tok))
    return {**ids, "v_range": [first_word, len(vocab)], "toker": toker_name}


def caption_value(tokenizer, raw, txt_id, img_fname):
    """A txt_db value: the caption's WordPiece ids and the name of its image."""
    ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(raw))
    return {"input_ids": ids, "img_fname": img_fname, "raw": raw, "id": txt_id}
