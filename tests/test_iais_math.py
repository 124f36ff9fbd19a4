"""IAIS losses against hand-worked values, gradients and mixed precision."""
import math

import pytest
import torch

from model import UniterConfig, UniterForImageTextRetrievalHardNeg
from model.iais import VARIANTS, IaisVariant, attention_blocks, iais_loss, pair_loss

TXT = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]]
IMG = [[0.7, 0.3], [0.4, 0.6]]
T2I = [[0.2, 0.8], [0.9, 0.1], [0.3, 0.7]]
I2T = [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]


def _softmax(row):
    e = [math.exp(x) for x in row]
    return [x / sum(e) for x in e]


def _kl(log_input, target):
    """batchmean KL written out: sum target * (log target - log_input) / rows."""
    return sum(t * (math.log(t) - li) for lr, tr in zip(log_input, target) for li, t in zip(lr, tr)
               if t > 0) / len(target)


def _log(m, eps=0.0):
    return [[math.log(x + eps) for x in row] for row in m]


def _matmul(a, b):
    return [[sum(a[i][k] * b[k][j] for k in range(len(b))) for j in range(len(b[0]))] for i in range(len(a))]


def _singular(self_attn, other, cross):
    idx = [max(range(len(r)), key=r.__getitem__) for r in cross]
    pseudo = [_softmax([other[a][b] for b in idx]) for a in idx]
    return _kl(_log(self_attn), pseudo) + _kl(_log(pseudo), self_attn)


def _distributed(self_attn, to_other, from_other):
    pseudo = _matmul(to_other, from_other)
    return _kl(_log(self_attn, 1e-6), pseudo) + _kl(_log(pseudo, 1e-6), self_attn)


EXPECTED = {
    "L-singular": _singular(TXT, IMG, T2I),
    "V-singular": _singular(IMG, TXT, I2T),
    "L-distributed": _distributed(TXT, T2I, I2T),
    "V-distributed": _distributed(IMG, I2T, T2I),
}


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_hand_worked_three_words_two_boxes(variant):
    t = lambda m: torch.tensor(m, dtype=torch.float64)
    # padded blocks: one padding word and one padding box that must be ignored
    txt = torch.zeros(4, 4, dtype=torch.float64); txt[:3, :3] = t(TXT)
    img = torch.zeros(3, 3, dtype=torch.float64); img[:2, :2] = t(IMG)
    t2i = torch.zeros(4, 3, dtype=torch.float64); t2i[:3, :2] = t(T2I)
    i2t = torch.zeros(3, 4, dtype=torch.float64); i2t[:2, :3] = t(I2T)
    got = pair_loss(IaisVariant.parse(variant), txt, img, t2i, i2t, 3, 2)
    assert got.item() == pytest.approx(EXPECTED[variant], rel=1e-12)
    assert EXPECTED[variant] > 0


def test_singular_alignment_is_zero_when_attentions_agree():
    """Uniform text attention and all words pointing at one box: the pseudo-attention is a
    softmax of equal values, i.e. uniform, so both KL terms vanish."""
    txt = torch.full((3, 3), 1 / 3)
    t2i = torch.tensor([[0.9, 0.1]] * 3)
    loss = pair_loss(IaisVariant("L", "singular"), txt, torch.tensor(IMG), t2i, torch.tensor(I2T), 3, 2)
    assert loss.abs().item() < 1e-7


def test_variant_values_parse_and_print():
    for name in VARIANTS:
        variant = IaisVariant.parse(name)
        assert str(variant) == name and IaisVariant.parse(variant) is variant
    assert IaisVariant.parse("V-distributed") == IaisVariant("V", "distributed")
    assert IaisVariant.parse(False) is None and IaisVariant.parse(None) is None
    assert IaisVariant.of("L", "singular") == IaisVariant("L", "singular")
    assert IaisVariant.of("V", False) is None and IaisVariant.of("V", None) is None
    for bad in ("singular", "L-Singular", "X-singular", True, 0, ""):
        with pytest.raises(ValueError, match="L-singular.*V-singular.*L-distributed.*V-distributed"):
            IaisVariant.parse(bad)
    with pytest.raises(ValueError, match="L-singular"):
        IaisVariant.of("L", "both")
    with pytest.raises(ValueError, match="L-singular"):
        IaisVariant("T", "singular")


def test_the_model_rejects_an_unknown_variant():
    model = _tiny_model().train()
    with pytest.raises(ValueError, match="V-distributed"):
        model(_tiny_iais_batch(), IAIS="singular")


def _random_scores(seed, p=2, heads=2, max_tl=6, max_nbb=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    n = max_tl + max_nbb
    scores = torch.randn(p, heads, n, n, generator=g, dtype=dtype)
    words = torch.zeros(p, n, dtype=torch.long)
    boxes = torch.zeros(p, n, dtype=torch.long)
    for j, (tl, nbb) in enumerate([(max_tl, max_nbb), (max_tl - 2, max_nbb - 2)][:p]):
        words[j, 1:tl - 1] = 1
        boxes[j, max_tl:max_tl + nbb] = 1
    return scores, words, boxes, max_tl


def test_fused_blocks_equal_the_four_pass_blocks():
    scores, words, boxes, max_tl = _random_scores(0, dtype=torch.float32)
    for a, b in zip(attention_blocks(scores, words, boxes, max_tl, fused=True),
                    attention_blocks(scores, words, boxes, max_tl, fused=False)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", ["L-singular", "V-singular", "L-distributed", "V-distributed"])
def test_gradcheck_loss_wrt_attention_scores(variant):
    scores, words, boxes, max_tl = _random_scores(1)
    scores.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: iais_loss(IaisVariant.parse(variant), s, words, boxes, max_tl), (scores,))


def _tiny_model(dtype=torch.float32):
    config = UniterConfig(50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return UniterForImageTextRetrievalHardNeg(config, img_dim=4, hard_size=1).to(dtype)


def _tiny_iais_batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    tl, nbb = 5, [3, 2]
    input_ids = torch.randint(5, 50, (1, tl), generator=g)
    attn = torch.zeros(2, tl + 3, dtype=torch.long)
    for i, n in enumerate(nbb):
        attn[i, :tl + n] = 1
    words = torch.zeros(1, tl + 3, dtype=torch.long); words[0, 1:tl - 1] = 1
    boxes = torch.zeros(1, tl + 3, dtype=torch.long); boxes[0, tl:tl + 3] = 1
    return {"input_ids": input_ids.expand(2, -1), "position_ids": torch.arange(tl)[None],
            "img_feat": torch.randn(2, 3, 4, generator=g, dtype=dtype),
            "img_pos_feat": torch.rand(2, 3, 7, generator=g, dtype=dtype),
            "attn_masks": attn, "txt_attn_masks": words, "img_attn_masks": boxes, "sample_size": 2}


@pytest.mark.parametrize("variant", ["L-singular", "L-distributed", "V-singular", "V-distributed"])
def test_gradcheck_through_the_model_float64(variant):
    model = _tiny_model(torch.float64)
    batch = _tiny_iais_batch(torch.float64)

    def loss_of(img_feat):
        b = dict(batch, img_feat=img_feat)
        rank_loss, losses = super(UniterForImageTextRetrievalHardNeg, model).forward(b, IAIS=variant)
        return losses["self_attn_loss"]

    feat = batch["img_feat"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss_of, (feat,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["L-singular", "V-distributed"])
def test_autocast_forward_keeps_iais_finite(dtype, variant):
    model = _tiny_model().train()
    batch = _tiny_iais_batch()
    with torch.autocast("cpu", dtype=dtype):
        rank_loss, losses = super(UniterForImageTextRetrievalHardNeg, model).forward(batch, IAIS=variant)
    assert losses["self_attn_loss"].dtype == torch.float32
    assert torch.isfinite(losses["self_attn_loss"]) and torch.isfinite(rank_loss).all()
    (rank_loss.mean() + losses["self_attn_loss"]).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
