"""Build ITM text DBs from a Karpathy-split JSON (dataset_flickr30k.json / dataset_coco.json).

    python scripts/prepro_itm.py --annotation dataset_flickr30k.json \\
        --vocab /pretrain/bert-base-cased-vocab.txt --output /txt

writes one txt_db per split: itm_flickr30k_{train,val,test}.db, or for COCO
itm_coco_{train,restval,val,test}.db. Captions are WordPiece-tokenised with BERT's
tokenizer from a local vocab file (bert-base-cased unless told otherwise). Text ids are
the Karpathy sentence ids (unique in the file: a JSON whose sentids restart for each image is
refused). Each caption's ``img_fname`` names its image in the released
img_dbs: Flickr30k "flickr30k_{stem:012d}.npz" (1000092795.jpg -> flickr30k_001000092795.npz),
COCO "coco_{filepath}_{cocoid:012d}.npz" (coco_val2014_000000391895.npz); change it with
--img_fname (fields: stem, filename, filepath, cocoid, imgid, dataset). The share of
[UNK] tokens is reported; above 5% (a vocabulary that does not fit the captions) nothing
is written unless --allow_unk. meta.json records the vocab file's name and sha256.
"""
import sys  # the repository this file is in comes first, whatever the path names (another clone, none)
from os.path import dirname, realpath
sys.path.insert(0, dirname(dirname(realpath(__file__))))
import utils.threads  # noqa: E402,F401  (next: sets the OpenMP thread count before torch loads OpenMP)
import os
from os.path import exists, join

from tqdm import tqdm

from data import DataError, write_txt_db
from data.karpathy import SPLITS, karpathy_entries, read_dataset, template_fields
from data.txt_db import TXT_DB_FILES
from scripts.wordpiece import (add_tokenizer_args, build_meta, caption_value, check_unk_share, load_tokenizer,
                               refuse_wrapped, unk_share)
from utils.cli import run
from utils.config import make_parser
from utils.outputs import refuse_overwriting_inputs, refuse_unwritable

MAX_UNK_SHARE = 0.05


def build_parser():
    p = make_parser(__doc__.split("\n")[0])
    a = p.add_argument
    a("--annotation", required=True, help="Karpathy-split JSON")
    add_tokenizer_args(p)
    a("--output", required=True, help="folder for the txt_dbs")
    a("--img_fname", default=None, help="img_fname template (see above)")
    a("--dataset", choices=sorted(SPLITS), default=None, help="dataset name (default: the JSON's 'dataset' field)")
    a("--allow_unk", action="store_true",
      help=f"write the DBs even when more than {MAX_UNK_SHARE:.0%}% of the tokens are [UNK]")
    return p


def tokenise(entries, tokenizer, meta):
    """{split: {text id: txt_db value}} of read_karpathy's entries; a caption that already
    holds [CLS] or [SEP] is refused (the model input wraps every caption in them)."""
    splits = {}
    for split, fname, captions in tqdm(entries, desc="tokenising"):
        examples = splits.setdefault(split, {})
        for txt_id, raw in captions:
            value = caption_value(tokenizer, raw, txt_id, fname)
            refuse_wrapped(value, meta, f"sentid {txt_id!r}")
            examples[txt_id] = value
    return splits


def main(opts):
    for path in (opts.annotation, opts.vocab):
        if not exists(path):
            raise DataError(f"{path} not found")
    refuse_unwritable("--output", opts.output, folder=True)
    if opts.img_fname is not None:
        template_fields(opts.img_fname)
    dataset, images = read_dataset(opts.annotation, opts.dataset)
    db_dirs = {split: join(opts.output, f"itm_{dataset}_{split}.db") for split in SPLITS[dataset]}
    refuse_overwriting_inputs([("--output", join(d, name), opts.output) for d in db_dirs.values()
                               for name in TXT_DB_FILES], [("--annotation", opts.annotation), ("--vocab", opts.vocab)])
    taken = [d for d in db_dirs.values() if exists(join(d, "data.mdb"))]
    if taken:  # refused before any split is written, so no set of DBs is left half new
        raise DataError(f"{taken[0]} already holds an LMDB; remove it or choose another --output")
    entries = karpathy_entries(opts.annotation, dataset, images, opts.img_fname)
    tokenizer = load_tokenizer(opts)
    meta = build_meta(tokenizer, opts.toker, opts.vocab)

    splits = {split: {} for split in SPLITS[dataset]}
    splits.update(tokenise(entries, tokenizer, meta))
    unknown, total = unk_share((e["input_ids"] for examples in splits.values() for e in examples.values()),
                               meta["UNK"])
    print(check_unk_share(unknown, total, opts.vocab, opts.allow_unk, MAX_UNK_SHARE))
    os.makedirs(opts.output, exist_ok=True)
    for split, examples in splits.items():
        db_dir = db_dirs[split]
        write_txt_db(db_dir, examples, meta)
        print(f"{db_dir}: {len(examples)} captions of {len({e['img_fname'] for e in examples.values()})} images")


if __name__ == "__main__":
    run(main, build_parser())
