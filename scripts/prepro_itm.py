"""Build ITM text DBs from a Karpathy-split JSON (dataset_flickr30k.json / dataset_coco.json).

    python scripts/prepro_itm.py --annotation dataset_flickr30k.json \\
        --vocab /pretrain/bert-base-cased-vocab.txt --output /txt

writes one txt_db per split: itm_flickr30k_{train,val,test}.db, or for COCO
itm_coco_{train,restval,val,test}.db. Captions are WordPiece-tokenised with BERT's
tokenizer from a local vocab file (bert-base-cased unless told otherwise). Text ids are
the Karpathy sentence ids. Each caption's ``img_fname`` names its image in the released
img_dbs: Flickr30k "flickr30k_{stem:012d}.npz" (1000092795.jpg -> flickr30k_001000092795.npz),
COCO "coco_{filepath}_{cocoid:012d}.npz" (coco_val2014_000000391895.npz); change it with
--img_fname (fields: stem, filename, filepath, cocoid, imgid, dataset).
"""
import argparse
import json
import os
import re
import sys
from os.path import abspath, dirname, exists, join

from tqdm import tqdm

sys.path.insert(0, dirname(dirname(abspath(__file__))))
from data.db import DataError, write_txt_db  # noqa: E402

DEFAULT_FNAME = {"flickr30k": "flickr30k_{stem:012d}.npz", "coco": "coco_{filepath}_{cocoid:012d}.npz"}
SPLITS = {"flickr30k": ("train", "val", "test"), "coco": ("train", "restval", "val", "test")}


def build_meta(tokenizer, toker_name):
    vocab = tokenizer.vocab
    ids = {k: vocab[f"[{k}]"] for k in ("UNK", "CLS", "SEP", "MASK")}
    first_word = next(i for tok, i in sorted(vocab.items(), key=lambda kv: kv[1])
                      if i > ids["MASK"] and not re.fullmatch(r"\[.*\]", tok))
    return {**ids, "v_range": [first_word, len(vocab)], "toker": toker_name}


def caption_value(tokenizer, raw, txt_id, img_fname):
    """A txt_db value: the caption's WordPiece ids and the name of its image."""
    ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(raw))
    return {"input_ids": ids, "img_fname": img_fname, "raw": raw, "id": txt_id}


def image_fields(img, dataset):
    stem = os.path.splitext(img["filename"])[0]
    digits = re.findall(r"\d+", stem)
    return {"stem": int(digits[-1]) if digits else stem, "filename": img["filename"],
            "filepath": img.get("filepath", ""), "cocoid": img.get("cocoid", img.get("imgid")),
            "imgid": img.get("imgid"), "dataset": dataset}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--annotation", required=True, help="Karpathy-split JSON")
    p.add_argument("--vocab", required=True, help="BERT WordPiece vocab file (e.g. bert-base-cased-vocab.txt)")
    p.add_argument("--output", required=True, help="folder for the txt_dbs")
    p.add_argument("--toker", default="bert-base-cased", help="tokenizer name stored in meta.json")
    p.add_argument("--uncased", action="store_true", help="lower-case captions (uncased vocabularies)")
    p.add_argument("--img_fname", default=None, help="img_fname template (see above)")
    p.add_argument("--dataset", choices=sorted(SPLITS), default=None,
                   help="dataset name (default: the JSON's 'dataset' field)")
    opts = p.parse_args()

    from pytorch_pretrained_bert import BertTokenizer
    for path in (opts.annotation, opts.vocab):
        if not exists(path):
            sys.exit(f"prepro_itm.py: error: {path} not found")
    with open(opts.annotation, encoding="utf-8") as f:
        ann = json.load(f)
    dataset = opts.dataset or ann.get("dataset")
    if dataset not in SPLITS:
        sys.exit(f"prepro_itm.py: error: unknown dataset {dataset!r}; pass --dataset flickr30k or coco")
    template = opts.img_fname or DEFAULT_FNAME[dataset]
    tokenizer = BertTokenizer(opts.vocab, do_lower_case=opts.uncased)
    meta = build_meta(tokenizer, opts.toker)

    splits = {s: {} for s in SPLITS[dataset]}
    for img in tqdm(ann["images"], desc="tokenising"):
        if img["split"] not in splits:
            continue
        fname = template.format(**image_fields(img, dataset))
        for sent in img["sentences"]:
            raw = sent.get("raw") or " ".join(sent["tokens"])
            txt_id = str(sent["sentid"])
            splits[img["split"]][txt_id] = caption_value(tokenizer, raw, txt_id, fname)
    os.makedirs(opts.output, exist_ok=True)
    for split, examples in splits.items():
        db_dir = join(opts.output, f"itm_{dataset}_{split}.db")
        try:
            write_txt_db(db_dir, examples, meta)
        except DataError as e:
            sys.exit(f"prepro_itm.py: error: {e}")
        print(f"{db_dir}: {len(examples)} captions of {len({e['img_fname'] for e in examples.values()})} images")


if __name__ == "__main__":
    main()
