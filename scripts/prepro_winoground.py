"""Build a txt_db and a twin-groups file from Winoground's examples.jsonl.

    python scripts/prepro_winoground.py --examples winoground/data/examples.jsonl \\
        --vocab /pretrain/bert-base-cased-vocab.txt --output /txt

writes /txt/itm_winoground.db (both captions of every example, WordPiece-tokenised from the
local vocab file; text ids "winoground_{id}_0" and "winoground_{id}_1", each caption naming
its own image) and /txt/winoground_groups.json (a list of {id, caption_0, caption_1, image_0,
image_1}, the input of scripts/retrieval_metrics.py --groups). Each line of examples.jsonl
needs the fields id, image_0, image_1, caption_0 and caption_1. An image's img_fname is
"{image}.npz" (ex_0_img_0 -> ex_0_img_0.npz; change it with --img_fname): the name that
scripts/convert_imgdir.py gives the BUTD features of images/ex_0_img_0.png saved as
ex_0_img_0.npz.
"""
import sys  # the repository this file is in comes first, whatever the path names (another clone, none)
from os.path import dirname, realpath
sys.path.insert(0, dirname(dirname(realpath(__file__))))
import utils.threads  # noqa: E402,F401  (next: sets the OpenMP thread count before torch loads OpenMP)
import json
import os
import string
from os.path import join

from data import DataError, write_txt_db
from data.txt_db import TXT_DB_FILES
from scripts.wordpiece import add_tokenizer_args, build_meta, caption_value, load_tokenizer, refuse_wrapped
from utils.cli import run
from utils.config import ConfigError, make_parser
from utils.outputs import refuse_overwriting_inputs, refuse_unwritable, write_json

FIELDS = ("id", "image_0", "image_1", "caption_0", "caption_1")
DB_NAME = "itm_winoground.db"
GROUPS_NAME = "winoground_groups.json"


def build_parser():
    p = make_parser(__doc__.split("\n")[0])
    a = p.add_argument
    a("--examples", required=True, help="Winoground's examples.jsonl")
    add_tokenizer_args(p)
    a("--output", required=True, help="folder for the txt_db and the groups file")
    a("--img_fname", default="{image}.npz", help="img_fname template of an image ({image}: its name)")
    return p


def read_examples(path):
    """The examples of a JSON-lines file, each checked for the fields used here."""
    if not os.path.exists(path):
        raise ConfigError(f"examples file {path} not found")
    if os.path.isdir(path):
        raise ConfigError(f"examples file {path} is a folder; pass Winoground's examples.jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); pass Winoground's examples.jsonl") from None
    examples = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n}: invalid JSON ({e.msg}); one example per line") from None
        except (RecursionError, ValueError) as e:
            raise DataError(f"{path} line {n}: unreadable JSON ({type(e).__name__}); one example per line") from None
        missing = [k for k in FIELDS if not isinstance(example, dict) or k not in example]
        if missing:
            raise DataError(f"{path} line {n} lacks {', '.join(missing)}; every example needs "
                            f"{', '.join(FIELDS)}")
        wrong = [k for k in FIELDS[1:] if not isinstance(example[k], str) or not example[k].strip()]
        if wrong or isinstance(example["id"], bool) or not isinstance(example["id"], (int, str)):
            field = wrong[0] if wrong else "id"
            raise DataError(f"{path} line {n}: {field} is {str(example[field])[:40]!r}; captions and image names "
                            f"are non-empty strings, the id an integer or a string")
        examples.append(example)
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def captions_and_groups(examples, tokenizer, img_fname, meta):
    """({text id: txt_db value}, [group]) of the examples; caption k goes with image k."""
    captions, groups = {}, []
    for example in examples:
        group = {"id": example["id"]}
        for k in (0, 1):
            txt_id = f"winoground_{example['id']}_{k}"
            if txt_id in captions:
                raise DataError(f"example id {example['id']!r} occurs twice; ids must be unique")
            image = img_fname.format(image=example[f"image_{k}"])
            captions[txt_id] = caption_value(tokenizer, example[f"caption_{k}"], txt_id, image)
            refuse_wrapped(captions[txt_id], meta, f"text id {txt_id!r}")
            group[f"caption_{k}"], group[f"image_{k}"] = txt_id, image
        groups.append(group)
    return captions, groups


def check_output(opts):
    """Before any work: OUTPUT can be made and none of the files written there is an input."""
    refuse_unwritable("--output", opts.output, folder=True)
    written = [join(opts.output, DB_NAME, name) for name in TXT_DB_FILES] + [join(opts.output, GROUPS_NAME)]
    refuse_overwriting_inputs([("--output", path, opts.output) for path in written],
                              [("--examples", opts.examples), ("--vocab", opts.vocab)])


def main(opts):
    check_output(opts)
    if not os.path.exists(opts.vocab):
        raise ConfigError(f"vocab file {opts.vocab} not found")
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(opts.img_fname) if name is not None]
        opts.img_fname.format(image="ex_0_img_0")
    except (KeyError, IndexError, ValueError):
        names = None
    if names is None or any(name != "image" for name in names):  # no {image.attr} or {image[0]} either
        raise ConfigError(f"--img_fname {opts.img_fname!r} may only use the field {{image}}")
    tokenizer = load_tokenizer(opts)
    examples = read_examples(opts.examples)
    meta = build_meta(tokenizer, opts.toker, opts.vocab)
    captions, groups = captions_and_groups(examples, tokenizer, opts.img_fname, meta)
    os.makedirs(opts.output, exist_ok=True)
    db_dir = join(opts.output, DB_NAME)
    write_txt_db(db_dir, captions, meta)
    write_json(join(opts.output, GROUPS_NAME), groups, indent=1)
    print(f"{db_dir}: {len(captions)} captions of {len({c['img_fname'] for c in captions.values()})} images; "
          f"{join(opts.output, GROUPS_NAME)}: {len(groups)} groups")


if __name__ == "__main__":
    run(main, build_parser())
