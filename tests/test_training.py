"""train_itm_hard_negatives.py end to end on the CPU: losses, checkpoints, resume,
two processes under both launchers, configuration errors."""
import json
import os
import signal
import subprocess

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import IMG_DB, TINY_CONFIG, TXT_DB
from helpers import PY, ROOT, copy_stopped_at, horovod_available, run, tiny_train_config, wait_until


def scalars(out, tag):
    acc = EventAccumulator(str(out / "log"))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def load(path):
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("iais", [None, "singular", "distributed"])
def test_tiny_run_end_to_end(tmp_path, iais):
    cfg = tiny_train_config(tmp_path / "c.json", num_train_steps=8, valid_steps=4, learning_rate=1e-3)
    out = tmp_path / "out"
    res = run(["train_itm_hard_negatives.py", "--config", cfg, "--output_dir", str(out)]
              + (["--IAIS", iais] if iais else []))
    assert res.returncode == 0, res.stderr[-3000:]
    losses = scalars(out, "loss_step")
    assert len(losses) == 8 and all(0 <= v < 10 for v in losses)  # finite, bounded hinge
    if iais:
        assert all(0 < v < 1e3 for v in scalars(out, "self_attn_loss"))
        assert len(scalars(out, "rank_loss")) == 8
    assert len(scalars(out, "lr")) == 8 and len(scalars(out, "grad_norm")) == 8
    for name in ("log/hps.json", "log/model.json", "log/log.txt", "ckpt/model_step_4.pt",
                 "ckpt/model_step_8.pt", "ckpt/train_state_8.pt", "results_test/results_8.json"):
        assert (out / name).exists(), name
    state = load(out / "ckpt" / "model_step_8.pt")
    assert "rank_output.weight" in state and "uniter.encoder.layer.1.output.LayerNorm.bias" in state
    first = load(out / "ckpt" / "model_step_4.pt")
    assert not torch.equal(first["uniter.pooler.dense.weight"], state["uniter.pooler.dense.weight"])
    assert json.loads((out / "log" / "hps.json").read_text())["IAIS"] == (iais or False)
    # the checkpoint evaluates with inf_itm.py
    res = run(["inf_itm.py", "--txt_db", TXT_DB, "--img_db", IMG_DB, "--checkpoint",
               str(out / "ckpt" / "model_step_8.pt"), "--model_config", TINY_CONFIG,
               "--output_dir", str(tmp_path / "eval"), "--batch_size", "8", "--n_workers", "0"])
    assert res.returncode == 0, res.stderr
    test_log = json.loads((out / "results_test" / "results_8.json").read_text())
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert {key: scores[key] for key in test_log} == test_log
    # scores.json also says what was scored: the fixture split's 60 captions of 12 images
    assert (scores["n_texts"], scores["n_images"], scores["unmatched_images"]) == (60, 12, [])
    assert (test_log["n_texts"], test_log["n_images"], test_log["unmatched_images"]) == (60, 12, [])


def test_recipe_optimises_the_ranking_loss():
    """The training recipe's pieces (AdamW with decay groups, clipping, hard negatives,
    IAIS) drive the loss of fixed batches down."""
    from conftest import load_fixture
    from model import UniterForImageTextRetrievalHardNeg
    from utils.optim import build_optimizer
    cases = load_fixture("ref_hardneg.pt")[:8]
    model = UniterForImageTextRetrievalHardNeg.from_pretrained(
        TINY_CONFIG, load_fixture("ref_model.pt"), img_dim=2048, hard_size=3).train()
    opt = build_optimizer(model, "adamw", learning_rate=1e-3, betas=[0.9, 0.98], weight_decay=0.01)
    history = []
    for _ in range(30):
        total = 0.0
        for case in cases:
            rank_loss, losses = model(case["batch"], case["sample_from"], IAIS=case["IAIS"])
            loss = rank_loss.mean() + losses["self_attn_loss"] * 0.1
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        opt.zero_grad()
        history.append(total)
    assert sum(history[-5:]) < 0.5 * sum(history[:5])


def test_resume_after_kill_is_bit_identical(tmp_path):
    cfg = tiny_train_config(tmp_path / "c.json", num_train_steps=10, valid_steps=2, dropout=0.1,
                            learning_rate=1e-3)
    args = ["train_itm_hard_negatives.py", "--config", cfg, "--IAIS", "singular"]
    ref = tmp_path / "ref"
    res = run(args + ["--output_dir", str(ref)])
    assert res.returncode == 0, res.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen([PY] + args + ["--output_dir", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(proc, (out / "ckpt" / "train_state_4.pt").exists, every=0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "ckpt" / "model_step_10.pt").exists(), "the run finished before it was killed"

    res = run(args + ["--output_dir", str(out)])
    assert res.returncode == 2 and "--resume" in res.stderr  # non-empty output_dir
    res = run(args + ["--output_dir", str(out), "--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = load(ref / "ckpt" / "model_step_10.pt"), load(out / "ckpt" / "model_step_10.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loader_workers_change_no_number(tmp_path):
    """Training with dropout and a validation pass in between, with 2 loader threads or 2
    processes, ends with the weights and scores of the run that builds every batch in the
    training loop (no loader draws from the RNG that dropout uses)."""
    cfg = tiny_train_config(tmp_path / "c.json", num_train_steps=4, valid_steps=2, dropout=0.1)
    outs = {}
    for workers, kind in (("0", "thread"), ("2", "thread"), ("2", "process")):
        out = outs[workers, kind] = tmp_path / f"{kind}{workers}"
        res = run(["train_itm_hard_negatives.py", "--config", cfg, "--output_dir", str(out),
                   "--IAIS", "singular", "--n_workers", workers, "--worker_type", kind])
        assert res.returncode == 0, res.stderr[-3000:]
    inline = outs.pop(("0", "thread"))
    ref = load(inline / "ckpt" / "model_step_4.pt")
    for out in outs.values():
        weights = load(out / "ckpt" / "model_step_4.pt")
        assert all(torch.equal(ref[k], weights[k]) for k in ref), out.name
        for tag in ("valid/recall_1", "valid/recall_5", "loss_step"):
            assert scalars(inline, tag) == scalars(out, tag), (out.name, tag)


@pytest.mark.parametrize("launcher", ["torchrun", "horovodrun"])
def test_two_processes_keep_identical_parameters(tmp_path, launcher):
    if launcher == "horovodrun" and not horovod_available():
        pytest.skip("horovod is not installed (make test installs it)")
    cfg = tiny_train_config(tmp_path / "c.json", num_train_steps=3, valid_steps=1, dropout=0.1)
    out = tmp_path / "out"
    res = run(["train_itm_hard_negatives.py", "--config", cfg, "--output_dir", str(out),
               "--IAIS", "distributed"], launcher=launcher)
    assert res.returncode == 0, (res.stderr + res.stdout)[-3000:]
    log = (out / "log" / "log.txt").read_text()
    for step in (1, 2, 3):
        assert f"step {step}: parameters identical on 2 rank(s)" in log
    expected = "via torch" if launcher == "torchrun" else "via horovod"
    assert expected in res.stderr + res.stdout
    (launch,) = json.loads((out / "log" / "run.json").read_text())  # written once, by rank 0
    assert launch["world_size"] == 2 and [r["rank"] for r in launch["ranks"]] == [0, 1]
    assert all(r["host"] for r in launch["ranks"]) and launch["devices"] == ["cpu", "cpu"]


def _error(tmp_path, extra, **config):
    cfg = tiny_train_config(tmp_path / "c.json", **config)
    res = run(["train_itm_hard_negatives.py", "--config", cfg, "--output_dir", str(tmp_path / "o")] + extra)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr
    return res.stderr


def test_config_errors(tmp_path):
    assert "unknown key 'learning_rat'" in _error(tmp_path, [], learning_rat=1.0)
    assert "did you mean 'learning_rate'" in _error(tmp_path, [], learning_rat=1.0)
    assert "margin must be a number" in _error(tmp_path, [], margin="big")
    assert "num_train_steps must be an integer" in _error(tmp_path, [], num_train_steps=2.5)
    assert "unknown argument --learnig_rate" in _error(tmp_path, ["--learnig_rate", "1"])
    assert "did you mean '--learning_rate'" in _error(tmp_path, ["--learnig_rate", "1"])
    assert "IAIS" in _error(tmp_path, ["--IAIS", "both"])
    assert "multiples of 8" in _error(tmp_path, [], hard_neg_size=3)
    assert "512 positions" in _error(tmp_path, [], max_txt_len=500)
    bad = tmp_path / "bad.json"
    bad.write_text('{"margin": 0.2,\n "seed": }')
    res = run(["train_itm_hard_negatives.py", "--config", str(bad), "--output_dir", str(tmp_path / "o")])
    assert res.returncode == 2 and "line 2 column" in res.stderr


def test_command_line_wins_over_config(tmp_path):
    from utils.config import parse_with_config
    from train_itm_hard_negatives import CONFIG_ONLY_KEYS, build_parser
    cfg = tiny_train_config(tmp_path / "c.json", learning_rate=0.5, margin=0.3)
    opts = parse_with_config(build_parser(), ["--config", cfg, "--learning_rate", "0.1"], CONFIG_ONLY_KEYS)
    assert opts.learning_rate == 0.1 and opts.margin == 0.3 and opts.train_txt_dbs == [TXT_DB]


def test_paper_configs_parse_unchanged():
    from utils.config import parse_with_config
    from train_itm_hard_negatives import CONFIG_ONLY_KEYS, build_parser, check_options
    for name in ("flickr-base", "flickr-large", "coco-base", "coco-large"):
        path = os.path.join(ROOT, "config", f"train-itm-{name}-8gpu-hn.json")
        opts = parse_with_config(build_parser(), ["--config", path], CONFIG_ONLY_KEYS)
        check_options(opts)
        assert opts.negative_size == 399 and opts.hard_neg_size == 31 and opts.optim == "adamw"


@pytest.mark.parametrize("flags,notice,loss_scaling", [
    (["--fp16"], "using bfloat16 autocast", False),
    (["--amp_dtype", "bf16"], "bfloat16", False),
    (["--amp_dtype", "fp16"], "torch.float16 with loss scaling", True)])
def test_mixed_precision_on_cpu(tmp_path, flags, notice, loss_scaling):
    cfg = tiny_train_config(tmp_path / "c.json", num_train_steps=2, valid_steps=2)
    out = tmp_path / "out"
    res = run(["train_itm_hard_negatives.py", "--config", cfg, "--output_dir", str(out), "--IAIS", "singular"] + flags)
    assert res.returncode == 0, res.stderr[-3000:]
    assert notice in res.stderr
    assert all(torch.isfinite(v).all() for v in load(out / "ckpt" / "model_step_2.pt").values())
    assert all(0 <= v < 10 for v in scalars(out, "loss_step"))
    scaler = torch.load(out / "ckpt" / "train_state_2.pt", weights_only=True)["scaler"]
    if loss_scaling:
        # GradScaler starts at 2**16 and halves at every overflow
        assert 1 <= scaler["scale"] <= 2.0 ** 16 and scaler["scale"] in [2.0 ** k for k in range(17)]
    else:
        assert scaler == {}


def test_resume_with_loss_scaling_is_bit_identical(tmp_path):
    """float16 training resumed from step 2 ends with the same weights as an uninterrupted
    run: the loss scale comes back with the optimizer (a fresh scale of 2**16 would
    overflow and skip a step the uninterrupted run took)."""
    cfg = tiny_train_config(tmp_path / "c.json", num_train_steps=6, valid_steps=2, learning_rate=1e-3)
    args = ["train_itm_hard_negatives.py", "--config", cfg, "--IAIS", "singular", "--amp_dtype", "fp16"]
    ref = tmp_path / "ref"
    res = run(args + ["--output_dir", str(ref)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "gradients overflowed at loss scale 65536" in res.stderr
    assert torch.load(ref / "ckpt" / "train_state_2.pt", weights_only=True)["scaler"]["scale"] < 2.0 ** 16

    out = copy_stopped_at(ref, tmp_path / "resumed", (4, 6))
    res = run(args + ["--output_dir", str(out), "--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr and "overflowed" not in res.stderr
    a, b = load(ref / "ckpt" / "model_step_6.pt"), load(out / "ckpt" / "model_step_6.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
