"""An evaluation's score matrix in shards, written as they complete, so that a stopped
evaluation continues (``inf_itm.py --resume``) instead of starting from zero.

    output_dir/shards/manifest.json    the settings that decide the scores (written first)
    output_dir/shards/scores_rank{R}of{W}_{first}_{last}.pt
        rows first..last (0-based, inclusive) of process R's captions, process R of W
        scoring the split's captions R, R + W, R + 2W, ... (data.captions.CaptionDataset):
        {"scores": [last - first + 1, images] float32, "txt_ids", "img_ids"}

Each shard is written atomically: a shard file present is complete. One that cannot be
read or does not hold the rows its name says (a damaged disk, a hand edit) is scored
again, with a warning naming it. A resume is the same evaluation: every setting of the
manifest must match, or it is refused before any work, one line per setting.
"""
import hashlib
import json
import os
import re
import shutil
from os.path import exists, join, realpath

import torch
from tqdm import tqdm

from engine.evaluation import scored_rows
from engine.run_settings import read_resume_record
from utils import distributed as dist
from utils.checkpoint import atomic_save
from utils.config import ConfigError, load_json
from utils.logger import LOGGER
from utils.outputs import first_line, write_json

SHARDS = "shards"
MANIFEST = "manifest.json"
_SHARD_FILE = re.compile(r"scores_rank\d+of\d+_\d+_\d+\.pt$")
_HEAD_BYTES = 1 << 20
# options of inf_itm.py that decide the scores (with the checkpoint, model config and world size)
SCORE_SETTINGS = ("txt_db", "img_db", "compressed_db", "conf_th", "max_bb", "min_bb", "num_bb", "batch_size",
                  "IAIS", "fp16", "amp_dtype", "shard_texts")


def shard_dir(output_dir):
    return join(output_dir, SHARDS)


def shard_name(rank, world_size, first, last):
    return f"scores_rank{rank}of{world_size}_{first}_{last}.pt"


def shard_blocks(n_rows, per_shard):
    """(first, last) of each shard of ``n_rows`` rows, ``per_shard`` rows each (the last fewer)."""
    return [(first, min(first + per_shard, n_rows) - 1) for first in range(0, n_rows, per_shard)]


def shard_files(output_dir):
    """The shard files in output_dir/shards (sorted names)."""
    folder = shard_dir(output_dir)
    return sorted(n for n in os.listdir(folder) if _SHARD_FILE.match(n)) if os.path.isdir(folder) else []


def file_identity(path):
    """What tells a checkpoint file from another: its resolved path, size, modification
    time and the SHA-256 of its first MiB."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path} not found")
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(_HEAD_BYTES)).hexdigest()
    st = os.stat(path)
    return {"path": realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_first_mib": head}


def manifest(opts, world_size, device, amp_dtype):
    """The settings an evaluation's scores depend on (paths resolved): inf_itm.py's options
    SCORE_SETTINGS, the checkpoint file, the model config's contents, the number of
    processes, the kind of device and the dtype the flags resolve to there."""
    settings = {key: getattr(opts, key) for key in SCORE_SETTINGS}
    settings["txt_db"], settings["img_db"] = realpath(opts.txt_db), realpath(opts.img_db)
    return {"checkpoint": file_identity(opts.checkpoint),
            "model_config": load_json(opts.model_config, "model config"), **settings, "world_size": world_size,
            "device": device.type, "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "float32"}


def _flat(record, prefix=""):
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def manifest_changes(recorded, current):
    """One line per setting that differs, ``setting: old -> new`` ((none): not recorded)."""
    old, new = _flat(recorded), _flat(current)

    def shown(values, key):
        return json.dumps(values[key]) if key in values else "(none)"
    return [f"{key}: {shown(old, key)} -> {shown(new, key)}"
            for key in sorted(set(old) | set(new)) if old.get(key, ...) != new.get(key, ...)]


def refuse_unfinished(output_dir, resume, overwrite):
    """Shards of an unfinished evaluation are continued with --resume or replaced with
    --overwrite; otherwise output_dir is refused."""
    present = shard_files(output_dir) if output_dir else []
    if present and not resume and not overwrite:
        raise ConfigError(f"output_dir {output_dir} holds {len(present)} shard(s) of an unfinished evaluation "
                          f"({shard_dir(output_dir)}); pass --resume to continue it (same settings), --overwrite "
                          f"to start it afresh, or choose another --output_dir")


def _read_manifest(path):
    return read_resume_record(path, f"it records the settings the shards were scored with, which --resume compares: "
                                    f"restore it, or remove {os.path.dirname(path)} (or pass --overwrite without "
                                    f"--resume) to start afresh")


def prepare_shards(output_dir, current, resume, overwrite):
    """Rank 0, with output_dir locked: check a resume's settings against the manifest
    (ConfigError, one line per change; nothing written), or start afresh (an earlier
    evaluation's shards removed where --overwrite asks it) and write the manifest ``current``.
    Returns whether shards are resumed."""
    refuse_unfinished(output_dir, resume, overwrite)
    folder, path = shard_dir(output_dir), join(shard_dir(output_dir), MANIFEST)
    if resume and (shard_files(output_dir) or exists(path)):
        changes = manifest_changes(_read_manifest(path), current)
        if changes:
            raise ConfigError(f"--resume: these settings differ from those the shards were scored with ({path}); "
                              f"resume with the recorded values, or pass --overwrite without --resume to start "
                              f"afresh", changes)
        LOGGER.info("--resume: %d shard file(s) in %s", len(shard_files(output_dir)), folder)
        return True
    if resume:
        LOGGER.warning("--resume: %s holds no shards; the evaluation starts from its first caption", output_dir)
    if shard_files(output_dir):
        LOGGER.info("removing the shards of an earlier evaluation in %s (--overwrite)", folder)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    write_json(path, current, indent=2)
    return False


def _shard_problem(shard, txt_ids, img_ids):
    """Why a loaded shard does not hold the rows of ``txt_ids`` against ``img_ids`` (None: it does)."""
    if not isinstance(shard, dict) or not {"scores", "txt_ids", "img_ids"} <= set(shard):
        return "not a shard of scores"
    scores = shard["scores"]
    if not torch.is_tensor(scores) or scores.dtype != torch.float32 or tuple(scores.shape) != (
            len(txt_ids), len(img_ids)):
        return f"scores are not a float32 [{len(txt_ids)} x {len(img_ids)}] matrix"
    if shard["txt_ids"] != list(txt_ids) or shard["img_ids"] != list(img_ids):
        return "other texts or images than its name says"
    return None


def read_shard(path, txt_ids, img_ids):
    """The rows a complete shard at ``path`` holds, or None (with a warning) when it is unreadable
    or holds other rows: its captions are then scored again."""
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True)
        problem = _shard_problem(shard, txt_ids, img_ids)
    except Exception as e:  # noqa: BLE001  (a truncated zip, bytes of anything else)
        problem = f"unreadable ({first_line(e)})"
    if problem is None:
        return shard["scores"]
    LOGGER.warning("shard %s: %s; its %d caption(s) are scored again", path, problem, len(txt_ids))
    return None


class ShardedRows:
    """The shards of process ``rank`` of ``world_size`` over ``dataset`` (an ItmEvalDataset),
    ``per_shard`` captions each, in ``folder``."""

    def __init__(self, folder, dataset, rank, world_size, per_shard):
        self.folder, self.dataset, self.rank, self.world_size = folder, dataset, rank, world_size
        self.blocks = shard_blocks(len(dataset), per_shard)

    def path(self, block):
        return join(self.folder, shard_name(self.rank, self.world_size, *block))

    def _ids(self, block):
        return self.dataset.ids[block[0]:block[1] + 1]

    def load_complete(self, scores):
        """Fill ``scores`` with the rows of the complete shards; returns the blocks left to score."""
        todo = []
        for block in self.blocks:
            rows = read_shard(self.path(block), self._ids(block), self.dataset.all_img_ids) \
                if exists(self.path(block)) else None
            if rows is None:
                todo.append(block)
            else:
                scores[block[0]:block[1] + 1] = rows
        return todo

    def write(self, block, rows):
        atomic_save({"scores": rows.clone(), "txt_ids": list(self._ids(block)),
                     "img_ids": list(self.dataset.all_img_ids)}, self.path(block))

    def remove(self):
        """This process's shard files (once the score matrix is written)."""
        for block in self.blocks:
            if exists(self.path(block)):
                os.remove(self.path(block))


def sharded_scores(model, shards, open_loader, show_progress):
    """Scores of this process's texts against every image, [n_txt, n_img] float32: the
    complete shards read, the other captions scored (``open_loader(indices)``: a loader of
    those dataset items, in order) and written a shard at a time. The progress bar counts
    pairs (captions x images) of this process."""
    dset = shards.dataset
    n_img = len(dset.all_img_ids)
    scores = torch.zeros(len(dset), n_img)
    todo = shards.load_complete(scores)
    indices = [i for first, last in todo for i in range(first, last + 1)]
    bar = tqdm(total=len(dset) * n_img, initial=(len(dset) - len(indices)) * n_img, unit="pair", unit_scale=True,
               desc="evaluation", disable=not show_progress, smoothing=0.1)
    ends = {last: (first, last) for first, last in todo}
    if indices:
        for k, row in enumerate(scored_rows(model, open_loader(indices), n_img)):
            i = indices[k]
            scores[i] = row
            bar.update(n_img)
            if i in ends:
                shards.write(ends[i], scores[ends[i][0]:i + 1])
    bar.close()
    return scores


def finish_shards(shards):
    """Once rank 0 has written the score matrix: every process removes its shard files,
    then rank 0 the folder (the manifest, temporary files of writes a stop cut short)."""
    dist.barrier()
    shards.remove()
    dist.barrier()
    if dist.is_main_process():
        shutil.rmtree(shards.folder, ignore_errors=True)
        LOGGER.info("score matrix complete: removed its shards (%s)", shards.folder)
