"""The Karpathy-split caption JSON (dataset_flickr30k.json, dataset_coco.json) that
scripts/prepro_itm.py turns into txt_dbs, and its contract: checked in full before any
caption is tokenised, each mistake one DataError naming the file and the entry.

``{"dataset": "flickr30k" | "coco", "images": [{"filename": str, "split": one of SPLITS,
"sentences": [{"sentid": int | str, "raw": str and/or "tokens": [str, ...]}, ...],
"filepath", "cocoid", "imgid": ...}, ...]}``. Text ids are the sentids, so they must be
unique in the file; an image's img_fname comes from a template of the image's fields
(``image_fields``), so two images must not get the same one."""
import os
import re
import string

from .errors import DataError, load_json

DEFAULT_FNAME = {"flickr30k": "flickr30k_{stem:012d}.npz", "coco": "coco_{filepath}_{cocoid:012d}.npz"}
SPLITS = {"flickr30k": ("train", "val", "test"), "coco": ("train", "restval", "val", "test")}
FIELDS = ("stem", "filename", "filepath", "cocoid", "imgid", "dataset")


def image_fields(img, dataset):
    """The fields an --img_fname template may use, of one image entry."""
    stem = os.path.splitext(img["filename"])[0]
    digits = re.findall(r"\d+", stem)
    return {"stem": int(digits[-1]) if digits else stem, "filename": img["filename"],
            "filepath": img.get("filepath", ""),
            # COCO's imgid is the Karpathy index, not the COCO id that names its image files
            "cocoid": img.get("cocoid") if dataset == "coco" else img.get("cocoid", img.get("imgid")),
            "imgid": img.get("imgid"), "dataset": dataset}


def template_fields(template, flag="--img_fname"):
    """The field names of an img_fname template; plain names only (attribute or index access
    such as {stem.real} or {filename[0]} would name files by a Python detail). A name that
    is not a field is left to caption_fname, which names the image it does not fit."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise DataError(f"{flag} {template!r} is not a valid template ({e}); fields: {', '.join(FIELDS)}") from None
    names = []
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit() or not name.isidentifier():
            raise DataError(f"{flag} {template!r}: {{{name}}} is not a field name (plain names only, no attribute "
                            f"or index access such as {{stem.real}} or {{filename[0]}}); fields: {', '.join(FIELDS)}")
        if spec and "{" in spec:
            raise DataError(f"{flag} {template!r}: nested fields are not taken; fields: {', '.join(FIELDS)}")
        names.append(name)
    return names


def caption_fname(template, fields, where="", flag="--img_fname"):
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise DataError(f"{flag} {template!r} does not fit image {fields['filename']!r}{where} "
                        f"({type(e).__name__}: {e}); fields: {', '.join(fields)}") from None


def _sentence_text(path, k, j, sent):
    """The caption text of images[k].sentences[j]: its 'raw', else its joined 'tokens'."""
    raw, tokens = sent.get("raw"), sent.get("tokens")
    if raw is not None and not isinstance(raw, str):
        raise DataError(f"{path}: images[{k}].sentences[{j}] has a 'raw' of type {type(raw).__name__}; "
                        f"a caption is a string")
    if tokens is not None and not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
        raise DataError(f"{path}: images[{k}].sentences[{j}] has 'tokens' that are not a list of strings")
    text = raw if raw and raw.strip() else " ".join(tokens or [])
    if not text.strip():
        raise DataError(f"{path}: images[{k}].sentences[{j}] (sentid {sent.get('sentid')!r}) has no text in "
                        f"'raw' or 'tokens'; fix or remove the caption")
    return text


def read_karpathy(path, dataset=None, template=None):
    """(dataset, template, [(split, img_fname, [(text id, caption text), ...]), ...]) of a
    Karpathy JSON, every image and caption checked. ``dataset`` and ``template`` override
    the file's dataset field and the dataset's img_fname template."""
    dataset, images = read_dataset(path, dataset)
    return (dataset, template or DEFAULT_FNAME[dataset]) + (karpathy_entries(path, dataset, images, template),)


def read_dataset(path, dataset=None):
    """(dataset, the image list) of a Karpathy JSON, its outer structure checked (what the
    names of the txt_dbs depend on); ``dataset`` overrides the file's field."""
    ann = load_json(path, "annotation")
    images = ann.get("images") if isinstance(ann, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{path}: no 'images' list; pass a Karpathy-split JSON (dataset_flickr30k.json)")
    dataset = dataset or ann.get("dataset")
    if not isinstance(dataset, str) or dataset not in SPLITS:
        raise DataError(f"unknown dataset {dataset!r} in {path}; pass --dataset flickr30k or coco")
    return dataset, images


def karpathy_entries(path, dataset, images, template=None):
    """[(split, img_fname, [(text id, caption text), ...]), ...] of read_dataset's image
    list, every image and caption checked."""
    template = template or DEFAULT_FNAME[dataset]
    used = template_fields(template)
    entries, sentids, fnames = [], {}, {}
    for k, img in enumerate(images):
        if not (isinstance(img, dict) and isinstance(img.get("filename"), str) and "split" in img
                and isinstance(img.get("sentences"), list)
                and all(isinstance(s, dict) and "sentid" in s and ("raw" in s or "tokens" in s)
                        for s in img["sentences"])):
            raise DataError(f"{path}: images[{k}] needs 'filename', 'split' and 'sentences' (each with 'sentid' "
                            f"and 'raw' or 'tokens')")
        split = img["split"]
        if not isinstance(split, str) or split not in SPLITS[dataset]:
            raise DataError(f"{path}: images[{k}] ({img['filename']!r}) has split {split!r}, not one of {dataset}'s "
                            f"{', '.join(SPLITS[dataset])}; rename it (or pass --dataset)")
        fields = image_fields(img, dataset)
        lacking = [f for f in used if f in fields and (fields[f] is None or fields[f] == "")]
        if lacking:
            raise DataError(f"{path}: images[{k}] ({img['filename']!r}) has no {lacking[0]!r}, which the img_fname "
                            f"template {template!r} needs; add it or pass --img_fname")
        fname = caption_fname(template, fields, f" (images[{k}] of {path})")
        if fname in fnames:
            raise DataError(f"{path}: images[{fnames[fname]}] and images[{k}] both get img_fname {fname!r} from "
                            f"{template!r}; their captions would be merged: pass an --img_fname that tells them apart")
        fnames[fname] = k
        captions = []
        for j, sent in enumerate(img["sentences"]):
            sentid = sent["sentid"]
            if isinstance(sentid, bool) or not isinstance(sentid, (int, str)) or sentid == "":
                raise DataError(f"{path}: images[{k}].sentences[{j}] has sentid {str(sentid)[:40]!r}; text ids are "
                                f"the sentids: an integer or a non-empty string")
            txt_id = str(sentid)
            if txt_id in sentids:
                raise DataError(f"{path}: sentid {txt_id!r} occurs twice (images[{sentids[txt_id]}] and images[{k}]); "
                                f"text ids are the sentids and must be unique in the file (Karpathy's count "
                                f"all captions from 0): renumber them")
            sentids[txt_id] = k
            captions.append((txt_id, _sentence_text(path, k, j, sent)))
        entries.append((split, fname, captions))
    if not sentids:
        raise DataError(f"{path} holds no captions")
    return entries
