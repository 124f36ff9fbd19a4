"""Data-building scripts, the download script and the container launcher."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from data import DetectFeatLmdb, TxtTokLmdb
from helpers import run


def _npz(path, n, nbb, seed):
    rng = np.random.default_rng(seed)
    np.savez(path, features=rng.random((n, 2048), dtype=np.float32), norm_bb=rng.random((n, 6), dtype=np.float32),
             conf=np.linspace(0.99, 0.01, n).astype(np.float32), soft_labels=rng.random((n, 1601), dtype=np.float32),
             nbb=np.array(nbb))


@pytest.mark.parametrize("compress", [False, True])
def test_convert_imgdir(tmp_path, compress):
    src = tmp_path / "flickr_demo"
    src.mkdir()
    for i, n in enumerate((30, 12, 50)):
        _npz(src / f"img{i}.npz", n, n, i)
    (src / "broken.npz").write_bytes(b"not an npz")
    res = run(["scripts/convert_imgdir.py", "--img_dir", str(src), "--output", str(tmp_path / "out"),
               "--nproc", "2", "--min_bb", "5", "--max_bb", "20"] + (["--compress"] if compress else []))
    assert res.returncode == 0, res.stderr
    assert "skipped 1 unreadable file(s)" in res.stdout and "broken.npz" in res.stdout
    db = DetectFeatLmdb(str(tmp_path / "out" / "flickr_demo"), 0.2, 20, 5, 36, compress)
    conf = np.linspace(0.99, 0.01, 30)
    expected = min(20, max(5, int((conf.astype(np.float32) > 0.2).sum())))
    assert db.name2nbb["img0.npz"] == expected
    feat, bb = db["img0.npz"]
    with np.load(src / "img0.npz") as raw:
        assert np.array_equal(feat.numpy(), raw["features"][:expected].astype(np.float16))
    assert sorted(db.name2nbb) == ["img0.npz", "img1.npz", "img2.npz"]


def test_convert_imgdir_keep_all(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    _npz(src / "a.npz", 40, 33, 0)
    res = run(["scripts/convert_imgdir.py", "--img_dir", str(src), "--output", str(tmp_path / "out"),
               "--nproc", "1", "--keep_all"])
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "out" / "imgs" / "nbb.json").read_text()) == {"a.npz": 33}
    # no count file for the default setting: the reader falls back to 'all' + nbb.json
    db = DetectFeatLmdb(str(tmp_path / "out" / "imgs"), 0.2, 100, 10, 36, False)
    assert db["a.npz"][0].shape == (33, 2048)


def test_convert_imgdir_help_states_the_npz_contract():
    res = run(["scripts/convert_imgdir.py", "--help"])
    assert res.returncode == 0, res.stderr
    for needle in ("features     [n, 2048]", "norm_bb      [n, 6]", "x1, y1, x2, y2, w, h", "[0, 1]",
                   "w = x2 - x1", "highest first", "conf         [n]", "soft_labels  [n, C]", "optional",
                   "nbb          []", "float16"):
        assert needle in res.stdout, needle


VOCAB = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]",
         "[unused100]", "[unused101]", "!", "a", "dog", "runs", "on", "the", "grass", "two", "men", "play",
         "##s", ".", "A", "Two"]


def test_prepro_itm_karpathy_json(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    ann = {"dataset": "flickr30k", "images": [
        {"filename": "1000092795.jpg", "imgid": 0, "split": "train",
         "sentences": [{"raw": "A dog runs on the grass.", "tokens": [], "sentid": 0},
                       {"raw": "Two men plays.", "tokens": [], "sentid": 1}]},
        {"filename": "42.jpg", "imgid": 1, "split": "test",
         "sentences": [{"raw": "a dog", "tokens": [], "sentid": 2}]}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    res = run(["scripts/prepro_itm.py", "--annotation", str(tmp_path / "ann.json"), "--vocab",
               str(tmp_path / "vocab.txt"), "--output", str(tmp_path / "txt")])
    assert res.returncode == 0, res.stderr
    train = TxtTokLmdb(str(tmp_path / "txt" / "itm_flickr30k_train.db"), -1)
    ids = {w: i for i, w in enumerate(VOCAB)}
    assert train["0"]["input_ids"] == [ids[w] for w in ("A", "dog", "runs", "on", "the", "grass", ".")]
    assert train["1"]["input_ids"] == [ids["Two"], ids["men"], ids["play"], ids["##s"], ids["."]]
    assert train.txt2img == {"0": "flickr30k_001000092795.npz", "1": "flickr30k_001000092795.npz"}
    meta = json.loads((tmp_path / "txt" / "itm_flickr30k_train.db" / "meta.json").read_text())
    assert meta == {"UNK": 100, "CLS": 101, "SEP": 102, "MASK": 103, "v_range": [106, len(VOCAB)],
                    "toker": "bert-base-cased", "vocab": "vocab.txt",
                    "vocab_sha256": hashlib.sha256((tmp_path / "vocab.txt").read_bytes()).hexdigest()}
    assert "vocab.txt: 0 of 14 tokens (0.00%) are [UNK]" in res.stdout
    test = TxtTokLmdb(str(tmp_path / "txt" / "itm_flickr30k_test.db"), -1)
    assert test.img2txts == {"flickr30k_000000000042.npz": ["2"]}
    assert (tmp_path / "txt" / "itm_flickr30k_val.db" / "id2len.json").exists()


def _mismatched(tmp_path):
    """A caption JSON whose words the vocabulary mostly lacks (an uncased text, say)."""
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    ann = {"dataset": "flickr30k", "images": [
        {"filename": "1.jpg", "split": "test",
         "sentences": [{"raw": "Zebras graze beside a dog.", "sentid": 0}, {"raw": "Cats sleep.", "sentid": 1}]}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    return ["scripts/prepro_itm.py", "--annotation", str(tmp_path / "ann.json"), "--vocab",
            str(tmp_path / "vocab.txt"), "--output", str(tmp_path / "txt")]


def test_prepro_itm_refuses_a_vocabulary_that_does_not_fit(tmp_path):
    res = run(_mismatched(tmp_path))
    assert res.returncode == 2
    (line,) = [line for line in res.stderr.splitlines() if ": error: " in line]  # after the progress bar
    assert f"--vocab {tmp_path / 'vocab.txt'}: 5 of 9 tokens (55.56%) are [UNK], more than 5%" in line
    assert "--allow_unk" in line and "Traceback" not in res.stderr
    assert not (tmp_path / "txt").exists()


def test_prepro_itm_allow_unk_writes_and_records_the_vocabulary(tmp_path):
    res = run(_mismatched(tmp_path) + ["--allow_unk"])
    assert res.returncode == 0, res.stderr
    assert "5 of 9 tokens (55.56%) are [UNK]" in res.stdout
    meta = json.loads((tmp_path / "txt" / "itm_flickr30k_test.db" / "meta.json").read_text())
    assert meta["vocab"] == "vocab.txt" and meta["toker"] == "bert-base-cased" and meta["UNK"] == 100
    assert meta["vocab_sha256"] == hashlib.sha256((tmp_path / "vocab.txt").read_bytes()).hexdigest()
    assert TxtTokLmdb(str(tmp_path / "txt" / "itm_flickr30k_test.db"), -1)["1"]["input_ids"] == [100, 100, VOCAB.index(".")]


def _db_contents(root):
    img = DetectFeatLmdb(str(root / "img_db" / "demo"), 0.2, 100, 10, 36, False)
    txt = TxtTokLmdb(str(root / "txt_db" / "itm_demo_test.db"), -1)
    return ({k: txt[k]["input_ids"] for k in txt.id2len}, img.name2nbb,
            {k: img[k][0].sum().item() for k in list(img.name2nbb)[:5]})


def test_demo_data_is_deterministic_and_readable(tmp_path):
    args = ["scripts/make_demo_data.py", "--n_train", "20", "--n_val", "4", "--n_test", "6"]
    for name in ("a", "b"):
        res = run(args + ["--output", str(tmp_path / name)])
        assert res.returncode == 0, res.stderr
    a, b = _db_contents(tmp_path / "a"), _db_contents(tmp_path / "b")
    assert a == b
    texts, name2nbb, _ = a
    assert len(texts) == 30 and len(name2nbb) == 30 and set(name2nbb.values()) == {3}  # the objects alone
    res = run(args + ["--output", str(tmp_path / "a")])
    assert res.returncode != 0 and "not empty" in res.stderr
    res = run(args + ["--output", str(tmp_path / "c"), "--background", "13"])
    assert res.returncode == 0, res.stderr
    assert all(10 <= n <= 16 for n in _db_contents(tmp_path / "c")[1].values())  # min_bb 10; 3 + 7..13 regions
    config = json.loads((tmp_path / "c" / "train-itm-demo.json").read_text())
    assert config["train_txt_dbs"] == [str(tmp_path / "c" / "txt_db" / "itm_demo_train.db")]
    assert config["negative_groups"] == str(tmp_path / "c" / "annotations" / "groups_train.json")
    assert config["model_config"] == "config/uniter-demo.json"
    for flag, value in (("--nouns", "2"), ("--twins", "1.5"), ("--n_val", "0")):
        res = run(args + ["--output", str(tmp_path / "d"), flag, value])
        assert res.returncode == 2 and flag in res.stderr and res.stderr.count("\n") == 1


def test_download_dry_run(tmp_path):
    # the release API at a closed local port: the dry run says it could not list the assets
    offline = {**os.environ, "IAIS_RELEASE_API": "http://127.0.0.1:9/repos/lancopku/IAIS/releases/tags/v0.1.0"}
    res = subprocess.run(["bash", "scripts/download_itm.sh", "--dry-run", str(tmp_path / "st")], cwd=ROOT,
                         capture_output=True, text=True, env=offline)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any("img_db/flickr30k.tar" in line for line in lines)
    assert sum("txt_db/itm_coco_" in line for line in lines) == 4
    assert any(line.endswith(f"{tmp_path}/st/pretrained/uniter-large.pt") for line in lines)
    assert any("bert-base-cased-vocab.txt" in line for line in lines)
    assert any(line.startswith("list the assets of http://127.0.0.1:9/") for line in lines)
    assert any("the assets are not listed" in line and "Connection refused" in line for line in lines)
    assert not (tmp_path / "st").exists()
    res = subprocess.run(["bash", "scripts/download_itm.sh"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "usage" in res.stderr


def test_launch_container_arguments(tmp_path):
    fake = tmp_path / "docker"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    dirs = [tmp_path / d for d in ("txt", "img", "out", "pre")]
    for d in dirs[:2] + dirs[3:]:
        d.mkdir()
    cmd = f"source launch_container.sh {' '.join(map(str, dirs))}"
    env = {**os.environ, "DOCKER": str(fake), "CUDA_VISIBLE_DEVICES": "2,3", "IAIS_IMAGE": "my/iais:1"}
    res = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    args = res.stdout.splitlines()
    assert args[args.index("--gpus") + 1] == '"device=2,3"'
    assert f"src={dirs[0]},dst=/txt,type=bind,readonly" in args
    assert f"src={dirs[1]},dst=/img,type=bind,readonly" in args
    assert f"src={dirs[2]},dst=/storage,type=bind" in args and dirs[2].is_dir()
    assert f"src={dirs[3]},dst=/pretrain,type=bind,readonly" in args
    assert args[-1] == "my/iais:1" and "/src" in args
    res = subprocess.run(["bash", "-c", "source launch_container.sh a b"], cwd=ROOT, capture_output=True,
                         text=True, env=env)
    assert res.returncode == 2 and "usage" in res.stderr


def test_demo_captions_hold_and_twins_need_the_relation(tmp_path):
    """Every demo caption is true of its image (the named objects' grid cells stand in the
    named relation); twins hold the same objects, and every caption of a twin is false of the
    other one, so only the relation tells them apart; the groups file pairs them so."""
    root = tmp_path / "d"
    res = run(["scripts/make_demo_data.py", "--n_train", "2", "--n_val", "2", "--n_test", "12",
               "--output", str(root)])
    assert res.returncode == 0, res.stderr
    img = DetectFeatLmdb(str(root / "img_db" / "demo"), 0.2, 100, 10, 36, False)
    txt = TxtTokLmdb(str(root / "txt_db" / "itm_demo_test.db"), -1)
    alignments = json.loads((root / "annotations" / "isda_test.json").read_text())

    def cell(fname, region):  # column and row of the 3x3 grid cell the box is centred in
        x1, y1, x2, y2 = img[fname][1][region, :4].tolist()
        return round(((x1 + x2) / 2 - 0.2) / 0.3), round(((y1 + y2) / 2 - 0.2) / 0.3)

    def holds(fname, rel, a, b):  # the larger offset decides; objects are never on a diagonal
        (ax, ay), (bx, by) = cell(fname, a), cell(fname, b)
        assert abs(ax - bx) != abs(ay - by), (fname, a, b)
        if abs(ax - bx) > abs(ay - by):
            return rel == ("left" if ax < bx else "right")
        return rel == ("above" if ay < by else "below")

    captions = {}  # image -> [(words, region of first noun, region of second noun)]
    for txt_id in txt.id2len:
        words = txt[txt_id]["raw"].split()
        (_, (a,)), (_, (b,)) = alignments[txt_id]
        captions.setdefault(txt.txt2img[txt_id], []).append((words, a, b))
    assert len(captions) == 12 and all(len(c) == 5 for c in captions.values())
    for fname, caps in captions.items():
        assert all(holds(fname, words[2], a, b) for words, a, b in caps), fname
    images = sorted(captions)
    groups = json.loads((root / "annotations" / "groups_test.json").read_text())
    assert len(groups) == 6 * 5  # five groups per twin pair
    assert {(g["image_0"], g["image_1"]) for g in groups} == set(zip(images[0::2], images[1::2]))
    for g in groups:
        assert txt.txt2img[g["caption_0"]] == g["image_0"] and txt.txt2img[g["caption_1"]] == g["image_1"]
    for first, second in zip(images[0::2], images[1::2]):  # every image is a twin
        nouns = lambda f: {w for words, _, _ in captions[f] for w in (words[1], words[-1])}
        assert nouns(first) == nouns(second)
        region = {f: {words[1]: a for words, a, _ in captions[f]} | {words[-1]: b for words, _, b in captions[f]}
                  for f in (first, second)}
        for this, other in ((first, second), (second, first)):
            false_there = sum(not holds(other, words[2], region[other][words[1]], region[other][words[-1]])
                              for words, _, _ in captions[this])
            assert false_there == 5, (this, other)


def test_device_benchmark_runs_on_the_cpu(tmp_path):
    """The GPU benchmark's code path (scoring, training with IAIS, MFU, loader check) on
    the CPU with a tiny model, and its FLOPs per pair."""
    import torch
    from scripts.bench_common import make_bench_db, open_bench_dbs
    from scripts.bench_device import bench_device
    from scripts.utilisation import forward_flops_per_pair
    from conftest import TINY_CONFIG
    from data import ItmRankDatasetHardNegFromText, ResumableStream, itm_rank_hn_collate
    from model import UniterConfig
    config = UniterConfig.from_json_file(TINY_CONFIG)
    config.vocab_size = 28996  # the bench DB's captions use the whole cased BERT vocabulary
    make_bench_db(str(tmp_path), 24)
    stream = ResumableStream(ItmRankDatasetHardNegFromText(*open_bench_dbs(str(tmp_path)), 7, IAIS="singular"),
                             itm_rank_hn_collate, 0, n_workers=2, device=torch.device("cpu"))
    out = bench_device(torch.device("cpu"), config, 0.0, n=8, hard=3, txt_len=6, num_bb=10,
                       peak_tflops=1.0, stream=stream)
    for tag in ("bf16_fused", "bf16_plain", "fp16_fused", "fp16_plain"):
        assert out[f"device_score_{tag}_pairs_per_s"] > 0 and out[f"device_train_iais_{tag}_steps_per_s"] > 0
        assert 0 < out[f"device_score_{tag}_mfu"] < 1
    assert out["device_fed_train_iais_bf16_steps_per_s"] > 0 and 0 <= out["device_fed_train_waiting_for_loader"] < 1
    # FLOPs per pair against torch's FLOP counter on the eager path (which counts attention)
    from torch.utils.flop_counter import FlopCounterMode
    from model import FastPaths, UniterForImageTextRetrieval
    model = UniterForImageTextRetrieval(config, 2048, 1, fast_paths=FastPaths(fused_attention=False)).eval()
    tl, nbb = 6, 10
    batch = {"input_ids": torch.randint(106, 500, (1, tl)), "position_ids": torch.arange(tl)[None],
             "img_feat": torch.randn(1, nbb, 2048), "img_pos_feat": torch.rand(1, nbb, 7),
             "attn_masks": torch.ones(1, tl + nbb, dtype=torch.long)}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(batch, compute_loss=False)
    assert forward_flops_per_pair(config, tl, nbb) == counter.get_total_flops()


def test_original_benchmark_needs_a_checkout(tmp_path):
    res = run(["scripts/bench_original.py", "--original_repo", str(tmp_path), "--data", str(tmp_path),
               "--weights", "w.pt", "--output", str(tmp_path / "o.json")])
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0
    assert "--original_repo" in res.stderr and "data/data.py" in res.stderr
    assert not (tmp_path / "o.json").exists()
    res = run(["scripts/bench.py", "--original_repo", str(tmp_path), "--output", str(tmp_path / "b.json")])
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0 and "--original_repo" in res.stderr
    assert not (tmp_path / "b.json").exists()


def test_original_benchmark_stand_ins(tmp_path):
    """The folder the original is imported from: its modules unchanged (linked), and
    stand-ins for what it imports but cannot run with today, behaving as those did."""
    from scripts.bench_original import TOOLZ, import_tree
    from scripts.original_checkout import ORIGINAL_MODULES
    checkout = tmp_path / "IAIS"
    for m in ORIGINAL_MODULES:
        (checkout / m).parent.mkdir(parents=True, exist_ok=True)
        (checkout / m).write_text(f"NAME = {m!r}\n")
    tree = import_tree(str(checkout))
    for path, text in TOOLZ.items():  # written only where toolz is missing; checked here in any case
        os.makedirs(os.path.join(tree, os.path.dirname(path)), exist_ok=True)
        with open(os.path.join(tree, path), "w") as f:
            f.write(text)
    probe = f"""
import sys; sys.path.insert(0, {tree!r})
import torch
from apex.normalization.fused_layer_norm import FusedLayerNorm
import horovod.torch as hvd
from utils.heatmap import plot_attention_headmap
from toolz.sandbox import unzip
from cytoolz import concat, partition_all
import data.itm, model.layer
assert data.itm.NAME == "data/itm.py" and model.layer.NAME == "model/layer.py"
assert FusedLayerNorm is torch.nn.LayerNorm
hvd.init(); assert (hvd.rank(), hvd.size(), hvd.local_size()) == (0, 1, 1)
assert plot_attention_headmap(1, x=2) is None
assert unzip([(1, "a"), (2, "b")]) == ((1, 2), ("a", "b"))
assert list(concat([[1], [2, 3]])) == [1, 2, 3]
assert list(partition_all(2, range(5))) == [(0, 1), (2, 3), (4,)]
"""
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_gpu_check_takes_the_cpu_branch_and_finishes(tmp_path):
    """make gpu-check's script without a GPU: the CUDA tests are collected and skipped, the
    device benchmark, the evaluation projection and the demo training run on the CPU."""
    out = tmp_path / "check"
    res = run(["scripts/gpu_check.py", "--output", str(out)], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())
    assert results["branch"] == "cpu" and results["peak_tflops"] is None
    tests = results["cuda_tests"]
    assert tests["exit_status"] == 0 and tests["skipped"] >= 10 and "passed" not in tests and not tests["failed_tests"]
    bench, evaluation = results["bench"], results["evaluation"]
    assert bench["device_score_bf16_fused_pairs_per_s"] > 0 and bench["device_fed_train_iais_bf16_steps_per_s"] > 0
    # shares of a rate measured at another moment: above 0, not bounded by 1 on a machine whose load changes
    assert bench["util_cpu_score_fp32_of_matmul"] > 0 and bench["util_cpu_train_iais_fp32_of_matmul"] > 0
    for dtype in ("fp16", "bf16"):
        rate = evaluation[f"eval_pipeline_{dtype}_pairs_per_s"]
        assert evaluation[f"eval_pipeline_{dtype}_buckets"] in (0, 4)
        assert evaluation[f"eval_projected_coco_5k_{dtype}_minutes"] == pytest.approx(25010 * 5000 / rate / 60)
        assert evaluation[f"eval_projected_flickr30k_1k_{dtype}_minutes"] == pytest.approx(5000 * 1000 / rate / 60)
    demo = results["demo"]
    assert "error" not in demo and demo["precision"] == "torch.bfloat16"
    assert 0 <= demo["test_recall"]["txt_r1"] <= 1
    assert results["targets"]["score_bf16_mfu_at_least_0.5"] is None  # no peak known for a CPU
    log = (out / "gpu_check.log").read_text()
    assert "GPU check finished" in log and "pytest -m cuda" in log and "train_itm_hard_negatives.py" in log


def test_gpu_check_names_missing_packages(monkeypatch, tmp_path):
    from scripts import gpu_check
    monkeypatch.setitem(gpu_check.NEEDED, "no_such_module_for_the_check", "no-such-package")
    with pytest.raises(SystemExit) as e:
        gpu_check.ensure_packages(str(tmp_path))  # an empty wheel folder does not have it either
    assert "no-such-package" in str(e.value) and "--wheels" in str(e.value)


def test_utilisation_is_model_flops_over_the_measured_matmul_rate():
    """The utilisation benchmark's code path on the CPU with a tiny model; the training
    step's FLOPs by the convention (backward twice the forward) against torch's counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from conftest import TINY_CONFIG
    from model import UniterConfig
    from model import FastPaths, UniterForImageTextRetrievalHardNeg
    from scripts.bench_common import BENCH_OBJECTIVES, synthetic_batch, train_loss, without_dropout
    from scripts.utilisation import bench_utilisation, train_step_flops
    config = UniterConfig.from_json_file(TINY_CONFIG)
    out = bench_utilisation(torch.device("cpu"), config, 0.0, n=8, hard=3, txt_len=6, num_bb=10)
    assert out["util_cpu_matmul_fp32_gflops"] > 0
    for name in ("score", "train_iais"):
        share = out[f"util_cpu_{name}_fp32_of_matmul"]
        assert share == pytest.approx(out[f"util_cpu_{name}_fp32_gflops"] / out["util_cpu_matmul_fp32_gflops"])
        assert share > 0
    # the model bench_utilisation measures, with eager attention for the counter
    model = UniterForImageTextRetrievalHardNeg(without_dropout(config), 2048, hard_size=3, objectives=BENCH_OBJECTIVES,
                                               fast_paths=FastPaths(fused_attention=False)).train()
    batch = {k: v for k, v in synthetic_batch(config, torch.device("cpu"), 8, 6, 10).items() if k != "gather_index"}
    with FlopCounterMode(display=False) as counter:
        train_loss(model, batch, "singular").backward()
    convention = train_step_flops(config, 8, 3, 6, 10)
    # the features' projection has no input gradient, so the convention counts a little more
    assert 0.85 * convention < counter.get_total_flops() <= convention


@pytest.mark.parametrize("script, required", [
    ("inf_itm.py", ["--txt_db", "--img_db", "--checkpoint", "--model_config", "--output_dir"]),
    ("scripts/retrieval_metrics.py", ["--output"]),
    ("scripts/prepro_itm.py", ["--annotation", "--vocab", "--output"]),
    ("scripts/prepro_winoground.py", ["--examples", "--vocab", "--output"]),
    ("scripts/compare_runs.py", ["--arm"]),
])
def test_help_shows_the_required_flags_as_required(script, required):
    """--help's usage line brackets what may be left out and nothing else."""
    res = run([script, "--help"])
    assert res.returncode == 0, res.stderr
    usage = " ".join(res.stdout.split("\n\n")[0].split())
    for flag in required:
        assert f" {flag} " in usage and f"[{flag} " not in usage, (flag, usage)
