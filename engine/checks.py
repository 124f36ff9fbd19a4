"""Checks made before the first training step or evaluation pass: a mistake in the data,
the model config or the checkpoint ends the run at once with one line naming it, instead
of a crash hours later or a wrong number.

Each costs at most a few seconds on the full Flickr30k and COCO DBs: the caption scan
decodes every caption once, the image DBs are probed with one image each (each image's
arrays, their dtype, shapes, width, finiteness and box range, are checked as it is first
read, in data/img_db.py)."""
import os

import torch

from data import DataError
from model import UniterConfig
from model.model import normalise_checkpoint_keys

from utils.checkpoint import CheckpointError, load_model_state
from utils.config import ConfigError
from utils.logger import LOGGER

def read_model_config(path):
    """A UniterConfig from ``path``, every key the model reads present and of the right type
    (UniterConfig checks them)."""
    return UniterConfig.from_json_file(path)


def _encoder_layers(keys):
    return len({k.split(".")[3] for k in keys if k.startswith("uniter.encoder.layer.")})


def _prefixed(missing, names):
    """A note on checkpoint names that are the model's missing ones behind a prefix (e.g.
    ``module.`` on part of them: a uniform one is removed when the checkpoint is read)."""
    wanted, hits = set(missing), []
    for name in names:
        parts = name.split(".")
        cut = next((i for i in range(1, len(parts)) if ".".join(parts[i:]) in wanted), None)
        if cut is not None:
            hits.append((".".join(parts[:cut]) + ".", name))
    if not hits:
        return ""
    prefix, first = hits[0]
    count = sum(p == prefix for p, _ in hits)
    return f"; {count} of its names are the model's behind the prefix {prefix!r} (first: {first})"


def _check_filled(model, state, path, allow_random_init):
    """Refuse a checkpoint that leaves part of the UNITER body (embeddings, encoder layers,
    pooler) at random initialisation or holds layers the model does not have."""
    own = [k for k in model.state_dict() if k.startswith("uniter.")]
    loaded = [k for k in normalise_checkpoint_keys(state) if k.startswith("uniter.")]
    missing = sorted(set(own) - set(loaded))
    unused = sorted(set(loaded) - set(own))
    if not missing and not unused:
        return
    detail = (f"checkpoint {path} has {_encoder_layers(loaded)} encoder layer(s), the model config "
              f"{_encoder_layers(own)}; {len(missing)} of the model's {len(own)} UNITER tensors are not in it"
              + (f" (first: {missing[0]})" if missing else "")
              + (f" and {len(unused)} of its tensors fit nowhere (first: {unused[0]})" if unused else "")
              + _prefixed(missing, normalise_checkpoint_keys(state)))
    if not allow_random_init:
        raise CheckpointError(f"{detail}; use the model config the checkpoint was trained with, or pass "
                              f"--allow_random_init if random weights are intended")
    LOGGER.warning("%s; random initialisation kept (--allow_random_init)", detail)


def load_model(cls, model_config, checkpoint, allow_random_init=False, resuming=False, **kwargs):
    """(model, its checkpoint's state dict): ``cls`` built from a checked model config and
    filled from ``checkpoint`` (None: random initialisation, as asked). ``resuming``: the
    weights will come from the run's own checkpoint; ``checkpoint`` is not read."""
    config = read_model_config(model_config)
    if resuming:
        return cls(config, **kwargs), {}
    state = load_model_state(checkpoint) if checkpoint else {}
    model = cls.from_pretrained(config, state, **kwargs)
    if checkpoint:
        _check_filled(model, state, checkpoint, allow_random_init)
    return model, state


_SCANNED = set()  # (txt_db, vocab_size, longest caption allowed) already checked in this process


def _check_captions(txt_db, vocab_size, max_len):
    """Token ids inside the model's vocabulary, lengths as id2len.json says and within the
    position table, for every caption the split uses."""
    key = (txt_db.db_dir, vocab_size, max_len)
    if key in _SCANNED:
        return
    id2len, seen = txt_db.id2len, 0
    for name, token in (("CLS", txt_db.cls_), ("SEP", txt_db.sep)):
        if not 0 <= token < vocab_size:
            raise DataError(f"{txt_db.db_dir}/meta.json: {name} {token!r} is outside the model's vocabulary "
                            f"(vocab_size {vocab_size})")
    for txt, value in txt_db.db.items():
        if txt not in id2len:
            continue
        seen += 1
        ids = value.get("input_ids") if isinstance(value, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise DataError(f"{txt_db.db_dir}: text {txt!r} has no list of integer input_ids; rebuild the txt_db")
        if ids and not 0 <= min(ids) <= max(ids) < vocab_size:
            token = max(ids) if max(ids) >= vocab_size else min(ids)
            raise DataError(f"{txt_db.db_dir}: text {txt!r} holds token id {token} "
                            f"outside the model's vocabulary (vocab_size {vocab_size}); the txt_db was made with "
                            f"another vocabulary than the model config's")
        if len(ids) != id2len[txt]:
            raise DataError(f"{txt_db.db_dir}: text {txt!r} has {len(ids)} tokens, id2len.json says {id2len[txt]}; "
                            f"rebuild the txt_db")
        if len(ids) + 2 > max_len:
            raise DataError(f"{txt_db.db_dir}: text {txt!r} has {len(ids)} tokens; with [CLS] and [SEP] it exceeds "
                            f"the model's {max_len} positions (max_position_embeddings); shorten or drop it")
    if seen != len(id2len):
        raise DataError(f"{txt_db.db_dir}: {len(id2len) - seen} text id(s) of id2len.json are not in the LMDB; "
                        f"rebuild the txt_db")
    _SCANNED.add(key)


def _check_img_db(img_db, img_dim):
    """The img_db's arrays have the shapes the model takes (one image read: a DB is
    written by one tool, so its first image tells its layout)."""
    if not img_db.name2nbb:
        raise DataError(f"{img_db.db_dir} holds no images")
    name = next(iter(img_db.name2nbb))
    arrays = img_db.read_arrays(name, cut=False)
    feat, bb = arrays["features"], arrays["norm_bb"]
    if feat.ndim != 2 or feat.shape[1] != img_dim:
        raise DataError(f"{img_db.db_dir}: image {name!r} has features of shape {feat.shape}, the model takes "
                        f"[boxes, {img_dim}]; use an img_db of {img_dim}-d region features")
    if bb.ndim != 2 or bb.shape != (feat.shape[0], 6):
        raise DataError(f"{img_db.db_dir}: image {name!r} has norm_bb of shape {bb.shape}, expected "
                        f"[{feat.shape[0]}, 6] (x1, y1, x2, y2, w, h)")


def check_split(txt_db, img_db, config, img_dim):
    """Every start-up check of one (txt_db, img_db) split against the model config."""
    txt_db.check_links()
    _check_captions(txt_db, config.vocab_size, config.max_position_embeddings)
    _check_img_db(img_db, img_dim)


def check_scores_finite(scores, txt_ids, img_ids, allow):
    """Refuse (or, with ``allow``, warn about) non-finite entries of a [texts x images] score matrix."""
    bad = ~torch.isfinite(scores)
    n_bad = int(bad.sum())
    if not n_bad:
        return
    rows, cols = bad.nonzero(as_tuple=True)
    texts = sorted({txt_ids[i] for i in rows.tolist()})
    images = sorted({img_ids[j] for j in cols.tolist()})
    detail = (f"{n_bad} of {bad.numel()} scores are not finite, for {len(texts)} text(s) (first: "
              f"{', '.join(texts[:3])}) and {len(images)} image(s) (first: {', '.join(images[:3])})")
    if not allow:
        raise DataError(f"{detail}; check those images' features and the checkpoint, or pass "
                        f"--allow_nonfinite_scores to write the recall anyway")
    LOGGER.warning("%s; recall computed anyway (--allow_nonfinite_scores)", detail)


def check_head(state, path, allow_random_init):
    """A checkpoint without a ranking head is scored through its ITM head (zero-shot); one
    with neither head would score with random weights."""
    if not any(k.endswith("itm_output.weight") for k in state) and not allow_random_init:
        raise CheckpointError(f"checkpoint {path} has neither rank_output nor itm_output: the scores would come "
                              f"from a random head; pass a retrieval or pre-training checkpoint (or "
                              f"--allow_random_init if that is intended)")


def refuse_earlier_results(output_dir, names, overwrite):
    """Keep an earlier run's results unless ``--overwrite`` asks to replace them."""
    present = [n for n in names if output_dir and os.path.exists(os.path.join(output_dir, n))]
    if present and not overwrite:
        raise ConfigError(f"output_dir {output_dir} already holds {present[0]} of an earlier evaluation; "
                          f"choose a new --output_dir or pass --overwrite")
