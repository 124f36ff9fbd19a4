"""Groups of confusable images (twins, compositional swaps, mined neighbours): read from a
JSON file, used to put each image's group members among its training negatives; and the
phrase-to-box annotations of scripts/isd.py (ISDa). The Winoground groups that
scripts/retrieval_metrics.py scores are read by utils/retrieval_metrics.group_indices."""
from .errors import DataError, load_json

WINOGROUND_KEYS = ("caption_0", "caption_1", "image_0", "image_1")


def _members(entry, path, k):
    if isinstance(entry, dict) and all(key in entry for key in WINOGROUND_KEYS):
        members = [entry["image_0"], entry["image_1"]]
    elif isinstance(entry, list):
        members = entry
    else:
        raise DataError(f"{path}: entry {k} must be a list of image names or an object with "
                        f"{', '.join(WINOGROUND_KEYS)}, got {str(entry)[:60]}")
    if not all(isinstance(m, str) for m in members):
        raise DataError(f"{path}: entry {k} holds a value that is not an image name: {str(members)[:60]}")
    return members


def read_image_groups(path):
    """{image: its confusable images} from a JSON list whose entries are lists of image
    names (img_fname, as in the txt_db) or Winoground-style groups ({"caption_0",
    "caption_1", "image_0", "image_1"}, as make_demo_data.py writes them). An image in
    several entries is confusable with the members of all of them."""
    content = load_json(path)
    if not isinstance(content, list):
        raise DataError(f"{path}: expected a JSON list of groups, got {type(content).__name__}")
    groups = {}
    for k, entry in enumerate(content):
        members = _members(entry, path, k)
        for image in members:
            groups.setdefault(image, set()).update(m for m in members if m != image)
    return {image: sorted(others) for image, others in groups.items() if others}


def read_annotations(path):
    """Phrase-to-box alignments ``{text id: [[[word indices], [box indices]], ...]}``
    (Flickr30k Entities style), checked for shape and types: non-empty lists of
    non-negative integers. Whether the indices fit each caption and image is checked where
    the pair is read (scripts/isd.py)."""
    annotations = load_json(path, "annotations")
    ok = isinstance(annotations, dict) and all(
        isinstance(pairs, list) and all(
            isinstance(pair, list) and len(pair) == 2 and all(
                isinstance(idx, list) and idx and all(isinstance(i, int) and not isinstance(i, bool) for i in idx)
                for idx in pair)
            for pair in pairs)
        for pairs in annotations.values())
    if not ok:
        raise DataError(f"annotations {path} must map text ids to lists of [[word indices], [box indices]] "
                        f"(non-empty lists of integers)")
    return annotations


def annotated_in_split(annotations, path, txt_ids, n_pairs):
    """The annotated text ids among the first ``n_pairs`` of the split's ``txt_ids``; an
    annotations file none of whose ids are there would give no ISDa without a word."""
    in_split = set(annotations) & set(txt_ids)
    if not in_split:
        raise DataError(f"annotations {path}: none of its {len(annotations)} text ids is in the split "
                        f"(first: {', '.join(list(annotations)[:3])}); give the annotations of this split's captions")
    used = in_split & set(txt_ids[:n_pairs])
    if not used:
        raise DataError(f"annotations {path}: none of its text ids is among the first {n_pairs} pairs of the split; "
                        f"raise --max_pairs to {len(txt_ids)}")
    return used
