"""Groups of confusable images (twins, compositional swaps, mined neighbours): read from a
JSON file, used to put each image's group members among its training negatives."""
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
