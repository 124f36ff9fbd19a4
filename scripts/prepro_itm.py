"""Build ITM text DBs from a Karpathy-split JSON (dataset_flickr30k.json / dataset_coco.json).

    python scripts/prepro_itm.py --annotation dataset_flickr30k.json \\
        --vocab /pretrain/bert-base-cased-vocab.txt --output /txt

writes one txt_db per split: itm_flickr30k_{train,val,test}.db, or for COCO
itm_coco_{train,restval,val,test}.db. Captions are WordPiece-tokenised with BERT's
tokenizer from a local vocab file (bert-base-cased unless told otherwise). Text ids are
the Karpathy sentence ids. Each caption's ``img_fname`` names its image in the released
img_dbs: Flickr30k "flickr30k_{stem:012d}.npz" (1000092795.jpg -> flickr30k_001000092795.npz),
COCO "coco_{filepath}_{cocoid:012d}.npz" (coco_val2014_000000391895.npz); change it with
--img_fname (fields: stem, filename, filepath, cocoid, imgid, dataset). The share of
[UNK] tokens is reported; above 5% (a vocabulary that does not fit the captions) nothing
is written unless --allow_unk. meta.json records the vocab file's name and sha256.
"""
import utils.threads  # noqa: F401  (first: sets the OpenMP thread count before torch loads OpenMP)
import os
import re
from os.path import exists, join

from tqdm import tqdm

from data import DataError, write_txt_db
from data.txt_db import TXT_DB_FILES
from scripts.wordpiece import (add_tokenizer_args, build_meta, caption_value, check_unk_share, load_tokenizer,
                               unk_share)
from utils.cli import run
from utils.config import ConfigError, load_json, make_parser
from utils.outputs import refuse_overwriting_inputs, refuse_unwritable

DEFAULT_FNAME = {"flickr30k": "flickr30k_{stem:012d}.npz", "coco": "coco_{filepath}_{cocoid:012d}.npz"}
SPLITS = {"flickr30k": ("train", "val", "test"), "coco": ("train", "restval", "val", "test")}
MAX_UNK_SHARE = 0.05


def image_fields(img, dataset):
    stem = os.path.splitext(img["filename"])[0]
    digits = re.findall(r"\d+", stem)
    return {"stem": int(digits[-1]) if digits else stem, "filename": img["filename"],
            "filepath": img.get("filepath", ""), "cocoid": img.get("cocoid", img.get("imgid")),
            "imgid": img.get("imgid"), "dataset": dataset}


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


def read_annotation(path):
    """The Karpathy JSON's image list, each entry with what the conversion reads."""
    ann = load_json(path, "annotation")
    images = ann.get("images") if isinstance(ann, dict) else None
    if not isinstance(images, list):
        raise ConfigError(f"{path}: no 'images' list; pass a Karpathy-split JSON (dataset_flickr30k.json)")
    for k, img in enumerate(images):
        if not (isinstance(img, dict) and isinstance(img.get("filename"), str) and "split" in img
                and isinstance(img.get("sentences"), list)
                and all(isinstance(s, dict) and "sentid" in s and ("raw" in s or "tokens" in s)
                        for s in img["sentences"])):
            raise ConfigError(f"{path}: images[{k}] needs 'filename', 'split' and 'sentences' (each with 'sentid' "
                              f"and 'raw' or 'tokens')")
    return ann, images


def caption_fname(template, fields):
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"--img_fname {template!r} does not fit image {fields['filename']!r} ({type(e).__name__}: "
                          f"{e}); fields: {', '.join(fields)}") from None


def tokenise(images, dataset, template, tokenizer):
    """{split: {text id: txt_db value}} of the dataset's splits."""
    splits = {s: {} for s in SPLITS[dataset]}
    for img in tqdm(images, desc="tokenising"):
        if img["split"] not in splits:
            continue
        fname = caption_fname(template, image_fields(img, dataset))
        for sent in img["sentences"]:
            raw = sent.get("raw") or " ".join(sent["tokens"])
            txt_id = str(sent["sentid"])
            splits[img["split"]][txt_id] = caption_value(tokenizer, raw, txt_id, fname)
    return splits


def main(opts):
    for path in (opts.annotation, opts.vocab):
        if not exists(path):
            raise DataError(f"{path} not found")
    refuse_unwritable("--output", opts.output, folder=True)
    ann, images = read_annotation(opts.annotation)
    dataset = opts.dataset or ann.get("dataset")
    if dataset not in SPLITS:
        raise ConfigError(f"unknown dataset {dataset!r} in {opts.annotation}; pass --dataset flickr30k or coco")
    template = opts.img_fname or DEFAULT_FNAME[dataset]
    db_dirs = {split: join(opts.output, f"itm_{dataset}_{split}.db") for split in SPLITS[dataset]}
    refuse_overwriting_inputs([("--output", join(d, name), opts.output) for d in db_dirs.values()
                               for name in TXT_DB_FILES], [("--annotation", opts.annotation), ("--vocab", opts.vocab)])
    taken = [d for d in db_dirs.values() if exists(join(d, "data.mdb"))]
    if taken:  # refused before any split is written, so no set of DBs is left half new
        raise DataError(f"{taken[0]} already holds an LMDB; remove it or choose another --output")
    tokenizer = load_tokenizer(opts)
    meta = build_meta(tokenizer, opts.toker, opts.vocab)

    splits = tokenise(images, dataset, template, tokenizer)
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
