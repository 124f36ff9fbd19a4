"""The CUDA path: loss scaling, autocast, pinned side-stream batches, NCCL under torchrun,
fused attention and evaluation on a GPU. Marked ``cuda``: skipped on a machine without
one, run by ``make gpu-check`` (``pytest -m cuda``)."""
import json
import os

import pytest
import torch

from conftest import IMG_DB, TINY_CONFIG, TXT_DB, load_fixture
from helpers import copy_stopped_at, run, tiny_train_config

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
CASES = load_fixture("ref_hardneg.pt")
REF_EVAL = load_fixture("ref_eval.pt")


def tiny_model(fused=True):
    from model import FastPaths, UniterConfig, UniterForImageTextRetrievalHardNeg
    config = UniterConfig.from_json_file(TINY_CONFIG)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    model = UniterForImageTextRetrievalHardNeg.from_pretrained(
        config, dict(load_fixture("ref_model.pt")), img_dim=2048, margin=0.2, hard_size=3,
        fast_paths=FastPaths(fused_attention=fused))
    return model.to(CUDA)


def on_cuda(batch):
    return {k: v.to(CUDA) if torch.is_tensor(v) else v for k, v in batch.items()}


def iais_case():
    return next(c for c in CASES if c["IAIS"])


def test_grad_scaler_skips_an_overflowed_step_and_halves_the_scale():
    from utils.precision import make_scaler
    model = tiny_model().train()
    case = iais_case()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = make_scaler(CUDA, True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.autocast("cuda", dtype=torch.float16):
        rank_loss, losses = model(on_cuda(case["batch"]), case["sample_from"], IAIS=case["IAIS"])
        loss = rank_loss.mean() + losses["self_attn_loss"]
    scaler.scale(loss * float("inf")).backward()  # an overflow, as a too-high scale gives
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 15
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    opt.zero_grad()
    with torch.autocast("cuda", dtype=torch.float16):
        rank_loss, losses = model(on_cuda(case["batch"]), case["sample_from"], IAIS=case["IAIS"])
        loss = rank_loss.mean() + losses["self_attn_loss"]
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 15
    assert not torch.equal(model.state_dict()["rank_output.weight"], before["rank_output.weight"])


def test_fp16_training_resumes_with_its_loss_scale(tmp_path):
    """--fp16 on CUDA is float16 with loss scaling; a run resumed at step 2 continues from
    the saved scale and ends where the uninterrupted run ends (CUDA kernels are not
    bit-reproducible run to run, so: to float16 training's precision)."""
    cfg = tiny_train_config(tmp_path / "c.json", num_train_steps=6, valid_steps=2, learning_rate=1e-3,
                            n_workers=2, pin_mem=True)
    args = ["train_itm_hard_negatives.py", "--config", cfg, "--IAIS", "singular", "--fp16"]
    ref = tmp_path / "ref"
    res = run(args + ["--output_dir", str(ref)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "device cuda:0" in res.stderr and "torch.float16 with loss scaling" in res.stderr
    state2 = torch.load(ref / "ckpt" / "train_state_2.pt", weights_only=True)["scaler"]
    state6 = torch.load(ref / "ckpt" / "train_state_6.pt", weights_only=True)["scaler"]
    assert state2["scale"] in [2.0 ** k for k in range(17)]

    out = copy_stopped_at(ref, tmp_path / "resumed", (4, 6))
    res = run(args + ["--output_dir", str(out), "--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr
    resumed6 = torch.load(out / "ckpt" / "train_state_6.pt", weights_only=True)["scaler"]
    assert resumed6["scale"] == state6["scale"]
    a = torch.load(ref / "ckpt" / "model_step_6.pt", weights_only=True)
    b = torch.load(out / "ckpt" / "model_step_6.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-2, atol=1e-3, msg=k)


@pytest.mark.parametrize("case", CASES[:6], ids=lambda c: f"{c['sample_from']}-{c['IAIS'] or 'plain'}")
def test_fused_attention_equals_eager(case):
    out = {}
    for fused in (True, False):
        model = tiny_model(fused).train()
        rank_loss, losses = model(on_cuda(case["batch"]), case["sample_from"], IAIS=case["IAIS"])
        (rank_loss.mean() + losses.get("self_attn_loss", 0)).backward()
        out[fused] = (rank_loss.detach(), losses.get("self_attn_loss"), model.rank_output.weight.grad)
    for a, b in zip(out[True], out[False]):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * b.abs().max().item())


def test_pinned_side_stream_batches_equal_cpu_batches(txt_db, img_db):
    from data import ItmRankDatasetHardNegFromText, ResumableStream, itm_rank_hn_collate
    ds = ItmRankDatasetHardNegFromText(txt_db, img_db, 7, IAIS="singular")
    cpu = ResumableStream(ds, itm_rank_hn_collate, seed=5)
    gpu = ResumableStream(ds, itm_rank_hn_collate, seed=5, n_workers=2, pin_memory=True, device=CUDA)
    for _ in range(70):  # across the epoch boundary (60 captions)
        a, b = next(cpu), next(gpu)
        assert a.keys() == b.keys()
        for k in a:
            assert b[k].device.type == "cuda", k
            assert torch.equal(a[k], b[k].cpu()), k


@pytest.mark.parametrize("amp", [None, "bf16", "fp16"])
def test_evaluation_on_cuda(tmp_path, amp):
    """inf_itm.py on the GPU (loader threads, pinned memory, image sides uploaded once per
    pass): the original's scores in fp32; under autocast within a few units of the dtype's
    resolution at the scores' scale (as on the CPU)."""
    res = run(["inf_itm.py", "--txt_db", TXT_DB, "--img_db", IMG_DB, "--checkpoint",
               os.path.join(os.path.dirname(TINY_CONFIG), "ref_model.pt"), "--model_config", TINY_CONFIG,
               "--output_dir", str(tmp_path / "out"), "--batch_size", "12", "--n_workers", "2", "--pin_mem"]
              + (["--amp_dtype", amp] if amp else []))
    assert res.returncode == 0, res.stderr[-3000:]
    scores = torch.load(tmp_path / "out" / "score_matrix.pt", weights_only=True)["scores"]
    if amp is None:
        torch.testing.assert_close(scores, REF_EVAL["score"], rtol=0, atol=1e-5)
        return
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    err = (scores - REF_EVAL["score"]).abs().max().item()
    assert 0 < err <= 8 * torch.finfo(dtype).eps * REF_EVAL["score"].abs().max().item()


def test_torchrun_one_process_with_nccl(tmp_path):
    cfg = tiny_train_config(tmp_path / "c.json", num_train_steps=2, valid_steps=2)
    out = tmp_path / "out"
    res = run(["--standalone", "train_itm_hard_negatives.py", "--config", cfg, "--output_dir", str(out),
               "--IAIS", "singular", "--fp16"], launcher="torchrun", nproc=1)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 process(es) via torch (nccl)" in res.stderr and "device cuda:0" in res.stderr
    assert json.loads((out / "results_test" / "results_2.json").read_text())
