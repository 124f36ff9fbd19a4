"""Learning-rate and IAIS-weight schedules against the original's values."""
import json
import os

import pytest

from conftest import FIXTURES
from model.iais import tsa_weight
from utils.optim import get_lr_sched, warmup_linear

with open(os.path.join(FIXTURES, "ref_sched.json")) as f:
    REF = json.load(f)


@pytest.mark.parametrize("step", sorted(REF, key=int))
def test_lr_and_tsa_match_the_original(step):
    lr, tsa = REF[step]
    assert get_lr_sched(int(step), learning_rate=5e-5, warmup_steps=500, num_train_steps=5000) == lr
    # float32 exp: libm implementations may differ in the last unit (~6e-8 relative)
    assert tsa_weight(int(step), 5000).item() == pytest.approx(tsa, rel=2e-7)


def test_warmup_linear_hand_values():
    assert warmup_linear(0, 10, 110) == 0 and warmup_linear(5, 10, 110) == 0.5
    assert warmup_linear(60, 10, 110) == 0.5 and warmup_linear(200, 10, 110) == 0
    assert warmup_linear(10, 10, 10) == 0  # warm-up as long as the run: no division by zero
