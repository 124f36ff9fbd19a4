"""Image feature stores: what every dataset and check reads region features through, and
the one factory that opens one.

A store answers for one image set under one box setting. A new on-disk format is a
reader module with a class that has the members of :class:`FeatureStore`, plus one
:func:`register_store` line naming how its folders are recognised; :func:`open_img_db`
then opens it wherever an img_db path is taken (training, inf_itm.py, the scripts).
The release's LMDB img_db (data/img_db.py) is the store tried last.
"""
import os
from typing import Protocol, runtime_checkable

from .errors import DataError


@runtime_checkable
class FeatureStore(Protocol):
    """db_dir: where its data is (named in errors); name2nbb: image name -> boxes kept;
    ``read_arrays(name, keys=("features", "norm_bb"), cut=True)``: those numpy arrays of
    one image (features [nbb, D] as stored, norm_bb [nbb, 6] float32: x1, y1, x2, y2, w,
    h in [0, 1]), cut to the kept boxes; ``store[name]``: the same as torch tensors
    (features, norm_bb)."""
    db_dir: str
    name2nbb: dict

    def read_arrays(self, fname, keys=("features", "norm_bb"), cut=True): ...

    def __getitem__(self, fname): ...


_STORES = []  # (name, recognises(path) -> bool, opener(path, conf_th, max_bb, min_bb, num_bb, compress))


def register_store(name, opener, recognises=None):
    """Makes ``opener`` open the folders ``recognises(path)`` accepts (None: any folder,
    after every other store was asked; only the release's LMDB store is that)."""
    _STORES.insert(len(_STORES) if recognises is None else 0, (name, recognises, opener))


def open_img_db(path, conf_th=0.2, max_bb=100, min_bb=10, num_bb=36, compress=False):
    """The feature store at ``path`` under the box setting (see data/img_db.py for the
    setting's meaning), of whichever registered format recognises it."""
    for _, recognises, opener in _STORES:
        if recognises is None or recognises(path):
            return opener(path, conf_th, max_bb, min_bb, num_bb, compress)
    raise DataError(f"img_db {path} is in none of the known formats ({', '.join(n for n, _, _ in _STORES)})")


class ImageLmdbGroup:
    """Opens each img_db once under one box setting, however many splits use it."""

    def __init__(self, conf_th, max_bb, min_bb, num_bb, compress):
        self.settings = (conf_th, max_bb, min_bb, num_bb, compress)
        self.stores = {}

    def __getitem__(self, path):
        key = os.path.normpath(path)
        if key not in self.stores:
            self.stores[key] = open_img_db(path, *self.settings)
        return self.stores[key]
