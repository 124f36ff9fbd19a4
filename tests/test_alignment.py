"""model/alignment.py: alignment objectives as plug-ins of UniterEncoder. IAIS through the
registry gives the original's call's numbers; a new objective is one registered class,
trained, weighted by its own schedule and logged under its own name."""
import itertools
import json
import textwrap

import pytest
import torch

from conftest import ROOT
from helpers import run, tiny_train_config
from model import OBJECTIVES, AlignmentObjective, build_objectives, register_objective
from test_train_step import case, tiny_state
from test_training import scalars

from engine.train_step import TrainStep

TOY = textwrap.dedent('''
    import torch
    from model import AlignmentObjective, register_objective


    @register_objective
    class AttentionEntropy(AlignmentObjective):
        """Mean entropy of the positives' attention over every position: a toy regulariser."""
        name = "toy-entropy"
        terms = ("attn_entropy",)

        def __call__(self, view):
            probs = torch.softmax(view.scores.float(), dim=-1)
            return {"attn_entropy": -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()}

        def weight(self, done_steps, num_train_steps):
            return 0.5
''')


@pytest.fixture
def toy(tmp_path):
    """The toy objective, registered from a module of its own (as a user would add one)."""
    (tmp_path / "toy_objective.py").write_text(TOY)
    namespace = {}
    exec(compile(TOY, str(tmp_path / "toy_objective.py"), "exec"), namespace)
    yield namespace["AttentionEntropy"]
    OBJECTIVES.pop("toy-entropy", None)


def test_iais_is_registered_under_its_names():
    assert {"iais-singular", "iais-distributed"} <= set(OBJECTIVES)
    (singular,), (distributed,) = build_objectives(["iais-singular", "iais-singular"]), build_objectives(
        ["iais-distributed"])
    assert (singular.alignment, distributed.alignment) == ("singular", "distributed")
    assert singular.terms == distributed.terms == ("self_attn_loss",) and singular.layer == -1
    assert float(singular.weight(4, 4)) == 1.0 and float(singular.weight(0, 4)) == pytest.approx(torch.exp(
        torch.tensor(-5.0)).item())


@pytest.mark.parametrize("alignment,side", list(itertools.product(["singular", "distributed"], ["L", "V"])))
def test_the_registry_gives_the_originals_call_exactly(ref_model_state, alignment, side):
    """A model built with the IAIS objective, aligning one side, gives the losses and the
    gradients of the original's forward(batch, IAIS='L-singular') call, bit for bit."""
    sample_from = "t" if side == "L" else "i"
    _, batch = case(sample_from, f"{side}-{alignment}")
    results = []
    for objectives, kwargs in (((), {"IAIS": f"{side}-{alignment}"}),
                               (build_objectives([f"iais-{alignment}"]), {"align": side})):
        model = tiny_state(ref_model_state, {}, objectives=objectives).model
        rank_loss, losses = model(batch, sample_from=sample_from, compute_loss=True, **kwargs)
        (rank_loss.mean() + losses["self_attn_loss"]).backward()
        results.append((rank_loss, losses, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (r0, l0, g0), (r1, l1, g1) = results
    assert torch.equal(r0, r1) and l0.keys() == l1.keys() == {"self_attn_loss"}
    assert torch.equal(l0["self_attn_loss"], l1["self_attn_loss"])
    assert len(g0) == len(g1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_a_new_objective_is_weighted_by_its_schedule(ref_model_state, toy):
    """One step with the toy objective alone: each hard batch's loss is its ranking loss
    plus 0.5 x its term, and the term is reported under its name."""
    (_, image_batch), (_, text_batch) = case("i", "V-singular"), case("t", "L-singular")
    objectives = build_objectives(["toy-entropy"])
    streams = {"image": itertools.repeat(image_batch), "text": itertools.repeat(text_batch)}
    state = tiny_state(ref_model_state, streams, lr=1e-3, objectives=objectives)
    step = TrainStep(state, positives=1, objectives=objectives, num_train_steps=4, lr_at=lambda s: 1e-3,
                     grad_norm=2.0, max_skipped_steps=3, device=torch.device("cpu"), amp_dtype=None)
    report = step(0)
    for terms in report.micro_losses:
        assert set(terms) == {"loss", "rank_loss", "attn_entropy"} and terms["attn_entropy"] > 0
        assert terms["loss"] == pytest.approx(terms["rank_loss"] + 0.5 * terms["attn_entropy"], rel=1e-6)


def test_a_new_objective_trains_from_the_command_line(tmp_path, toy):
    """The toy objective beside IAIS, selected with --alignment and trained for two steps:
    both terms are logged at every step."""
    cfg = tiny_train_config(tmp_path / "c.json", num_train_steps=2, valid_steps=2)
    out = tmp_path / "out"
    argv = ["train_itm_hard_negatives.py", "--config", cfg, "--output_dir", str(out), "--IAIS", "singular",
            "--alignment", "toy-entropy"]
    launcher = (f"import sys, runpy; sys.path.insert(0, {str(tmp_path)!r}); import toy_objective; "
                f"sys.argv = {argv!r}; runpy.run_path({str(ROOT + '/train_itm_hard_negatives.py')!r}, "
                f"run_name='__main__')")
    res = run(["-c", launcher])
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(scalars(out, "attn_entropy")) == 2 and len(scalars(out, "self_attn_loss")) == 2
    assert json.loads((out / "log" / "hps.json").read_text())["alignment"] == ["toy-entropy"]
    assert "alignment: iais-singular, toy-entropy" in (out / "log" / "log.txt").read_text()


def test_registry_errors(toy):
    with pytest.raises(ValueError, match="unknown alignment objective 'toy-entropi'.*did you mean 'toy-entropy'"):
        build_objectives(["toy-entropi"])

    class Nameless(AlignmentObjective):
        terms = ("x",)
    with pytest.raises(ValueError, match="needs a name"):
        register_objective(Nameless)

    class Clash(AlignmentObjective):
        name, terms = "toy-clash", ("self_attn_loss",)
    register_objective(Clash)
    try:
        for names in (["iais-singular", "toy-clash"], ["iais-singular", "iais-distributed"]):
            with pytest.raises(ValueError, match="loss terms of the same name"):
                build_objectives(names)
        other = type("Other", (AlignmentObjective,), {"name": "toy-clash", "terms": ("y",)})
        with pytest.raises(ValueError, match="registered twice"):
            register_objective(other)
    finally:
        OBJECTIVES.pop("toy-clash")


def test_align_and_iais_must_agree(ref_model_state):
    _, batch = case("t", "L-singular")
    model = tiny_state(ref_model_state, {}).model
    with pytest.raises(ValueError, match="aligns 'L', but align='V'"):
        model(batch, sample_from="t", IAIS="L-singular", align="V")
    with pytest.raises(ValueError, match="align must be one of"):
        model(batch, sample_from="t", align="text")
