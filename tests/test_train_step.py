"""engine/train_step.py: one optimizer step against the original's gradients, the
learning rate and IAIS weight it uses, the non-finite policy, and how often it waits for
the device."""
import itertools
import random

import pytest
import torch

from conftest import TINY_CONFIG, load_fixture
from engine.checkpointing import TrainingState
from data import ItmRankDatasetHardNegFromImage, ItmRankDatasetHardNegFromText
from engine.train_step import SIDES, NonFinitePolicy, TrainStep, hard_batch_loss, read_terms
from model import FastPaths, UniterConfig, UniterForImageTextRetrievalHardNeg, build_objectives
from model.iais import tsa_weight
from utils.cli import TrainingError
from utils.precision import make_scaler

CASES = load_fixture("ref_hardneg.pt")


def case(sample_from, iais):
    found = next(c for c in CASES if c["sample_from"] == sample_from and c["IAIS"] == iais)
    return found, {k: (v.float() if k == "img_feat" else v) for k, v in found["batch"].items()}


def objectives_of(alignment):
    return build_objectives([f"iais-{alignment}"] if alignment else [])


def tiny_state(ref_model_state, streams, lr=1.0, objectives=()):
    config = UniterConfig.from_json_file(TINY_CONFIG)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    model = UniterForImageTextRetrievalHardNeg.from_pretrained(config, dict(ref_model_state), img_dim=2048,
                                                               hard_size=3, fast_paths=FastPaths.original(),
                                                               objectives=objectives)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return TrainingState(model.train(), optimizer, make_scaler(torch.device("cpu"), False), streams)


def train_step(state, alignment, num_train_steps=4, lr_at=lambda step: 0.1 * step, max_skipped=3):
    return TrainStep(state, positives=1, objectives=state.model.uniter.encoder.objectives,
                     num_train_steps=num_train_steps, lr_at=lr_at,
                     grad_norm=-1, max_skipped_steps=max_skipped, device=torch.device("cpu"), amp_dtype=None)


def test_sides_train_in_the_original_order_with_their_variants():
    assert [(s.stream, s.sample_from, s.align) for s in SIDES] == [("image", "i", "V"), ("text", "t", "L")]


def test_one_step_applies_the_originals_gradients_of_both_sides(ref_model_state):
    """Step 5 of a 4-step schedule: the IAIS weight exp(5 * (4/4 - 1)) is 1, so the update is
    lr * (the original's gradient of the image-side batch + that of the text-side batch)."""
    (image_case, image_batch), (text_case, text_batch) = case("i", "V-singular"), case("t", "L-singular")
    streams = {"image": itertools.repeat(image_batch), "text": itertools.repeat(text_batch)}
    state = tiny_state(ref_model_state, streams, objectives=objectives_of("singular"))
    before = {n: p.detach().clone() for n, p in state.model.named_parameters()}
    report = train_step(state, "singular")(4)
    assert report.lr == pytest.approx(0.5) and state.optimizer.param_groups[0]["lr"] == report.lr
    assert report.applied and report.skipped_in_a_row == 0 and report.stop is None
    assert report.rows == image_batch["attn_masks"].size(0) + text_batch["attn_masks"].size(0)
    assert [sorted(m) for m in report.micro_losses] == [["loss", "rank_loss", "self_attn_loss"]] * 2
    expected_loss = sum(float(c["rank_loss"].mean() + c["self_attn_loss"]) for c in (image_case, text_case))
    assert report.loss == pytest.approx(expected_loss, abs=1e-5)
    params = dict(state.model.named_parameters())
    for name, ref in image_case["grads"].items():
        grad = ref + text_case["grads"][name]
        torch.testing.assert_close(params[name].detach(), before[name] - 0.5 * grad, rtol=1e-4,
                                   atol=1e-4 * grad.abs().max().item())
    assert all(p.grad is None for p in params.values())


def test_hard_batch_loss_divides_by_the_positives_and_weights_iais(ref_model_state):
    ref, batch = case("t", "L-distributed")
    model = tiny_state(ref_model_state, {}, objectives=objectives_of("distributed")).model
    tsa = tsa_weight(1, 4)
    loss, parts = hard_batch_loss(model, batch, "t", "L", {"self_attn_loss": tsa}, positives=4)
    torch.testing.assert_close(parts["rank_loss"], ref["rank_loss"].mean() / 4, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, ref["rank_loss"].mean() / 4 + ref["self_attn_loss"] * tsa, rtol=0, atol=1e-6)
    ref, batch = case("t", False)
    loss, parts = hard_batch_loss(model, batch, "t", None, {"self_attn_loss": tsa}, positives=2)
    assert parts == {}
    torch.testing.assert_close(loss, ref["rank_loss"].mean() / 2, rtol=0, atol=1e-6)


def test_non_finite_gradients_skip_the_update_then_stop_the_run(ref_model_state):
    _, image_batch = case("i", False)
    _, text_batch = case("t", False)
    broken = dict(text_batch, img_feat=torch.full_like(text_batch["img_feat"], float("nan")))
    state = tiny_state(ref_model_state, {"image": itertools.repeat(image_batch), "text": itertools.repeat(broken)})
    before = {n: p.detach().clone() for n, p in state.model.named_parameters()}
    step = train_step(state, False, max_skipped=2)
    first, second = step(0), step(1)
    assert not first.applied and first.skipped_in_a_row == 1 and first.stop is None
    assert not second.applied and second.skipped_in_a_row == 2 and isinstance(second.stop, TrainingError)
    assert "2 consecutive steps had non-finite gradients" in str(second.stop)
    assert all(torch.equal(p, before[n]) for n, p in state.model.named_parameters())


def test_policy_counts_skips_in_a_row_only():
    policy = NonFinitePolicy(max_skipped=2)
    outcomes = [policy.record(step, finite, None, None) for step, finite in enumerate([False, True, False])]
    assert outcomes == [None, None, None] and policy.skipped == 1
    assert isinstance(policy.record(3, False, None, None), TrainingError)


# what waits for the device: every way a tensor's value reaches the host
DEVICE_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def count_device_reads(monkeypatch, fn):
    """fn() with every host read of a tensor's value counted -> (its result, the count)."""
    count = [0]
    for name in DEVICE_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        result = fn()
    finally:
        monkeypatch.undo()
    return result, count[0]


def _reads_of_one_step(monkeypatch, ref_model_state, txt_db, img_db, positives, negatives, alignment):
    """Device reads during one TrainStep of ``positives`` positives, its batches built beforehand
    (the loader's own work is not the step's)."""
    iais = alignment or False
    sides = {"image": ItmRankDatasetHardNegFromImage(txt_db, img_db, negatives, IAIS=iais),
             "text": ItmRankDatasetHardNegFromText(txt_db, img_db, negatives, IAIS=iais)}
    streams = {name: iter([ds[i] for i in range(positives)]) for name, ds in sides.items()}
    state = tiny_state(ref_model_state, streams, lr=1e-3, objectives=objectives_of(alignment))
    step = TrainStep(state, positives=positives, objectives=objectives_of(alignment), num_train_steps=10,
                     lr_at=lambda s: 1e-3,
                     grad_norm=2.0, max_skipped_steps=3, device=torch.device("cpu"), amp_dtype=None)
    report, reads = count_device_reads(monkeypatch, lambda: step(0))
    assert len(report.micro_losses) == 2 * positives and report.applied
    return reads


@pytest.mark.parametrize("alignment", [None, "singular", "distributed"])
def test_the_step_reads_the_device_a_fixed_number_of_times(monkeypatch, ref_model_state, txt_db, img_db, alignment):
    """Loss terms stay on the device until the step is done: whatever train_batch_size, one
    step reads the device twice (gradient finiteness, then every loss term at once) when every
    negative is trained (the demo), plus once per text-side batch whose hard negatives were
    chosen by score (the chosen rows decide the batch's length)."""
    random.seed(0)
    kept = [_reads_of_one_step(monkeypatch, ref_model_state, txt_db, img_db, n, 3, alignment) for n in (1, 4)]
    assert kept == [2, 2]
    chosen = [_reads_of_one_step(monkeypatch, ref_model_state, txt_db, img_db, n, 7, alignment) for n in (1, 4)]
    assert chosen == [2 + 1, 2 + 4]


def test_read_terms_gives_each_value_as_item_would():
    terms = [{"loss": torch.tensor(0.1), "rank_loss": torch.tensor(1 / 3)},
             {"loss": torch.tensor(2.5, dtype=torch.bfloat16)}, {}]
    assert read_terms(terms) == [{k: v.item() for k, v in t.items()} for t in terms]
    assert read_terms([]) == [] and read_terms([{}]) == [{}]
