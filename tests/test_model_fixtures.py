"""The model reproduces outputs of the original code (tests/fixtures/original)."""
import pytest
import torch

from conftest import TINY_CONFIG, load_fixture
from model import (CheckpointMismatchError, FastPaths, UniterConfig, UniterForImageTextRetrieval,
                   UniterForImageTextRetrievalHardNeg, scoring_mode)

CASES = load_fixture("ref_hardneg.pt")
CASE_IDS = [f"{c['sample_from']}-{c['IAIS'] or 'plain'}-{c['idx']}" for c in CASES]


def tiny_hardneg(state, fused, **fast_paths):
    config = UniterConfig.from_json_file(TINY_CONFIG)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    return UniterForImageTextRetrievalHardNeg.from_pretrained(
        config, dict(state), img_dim=2048, margin=0.2, hard_size=3,
        fast_paths=FastPaths(fused_attention=fused, **fast_paths))


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_hard_negative_training_forward(case, fused, ref_model_state):
    model = tiny_hardneg(ref_model_state, fused)
    batch = {k: (v.float() if k == "img_feat" else v) for k, v in case["batch"].items()}
    model.train()
    rank_loss, losses = model(batch, sample_from=case["sample_from"], compute_loss=True, IAIS=case["IAIS"])
    torch.testing.assert_close(rank_loss, case["rank_loss"], rtol=0, atol=1e-5)
    if not case["IAIS"]:
        assert losses == {}
        return
    torch.testing.assert_close(losses["self_attn_loss"], case["self_attn_loss"], rtol=0, atol=1e-5)
    assert set(losses) == {"self_attn_loss"}
    (rank_loss.mean() + losses["self_attn_loss"]).backward()
    params = dict(model.named_parameters())
    for name, ref in case["grads"].items():
        # rtol 1e-4 relative to the gradient's scale (elementwise, near-zero entries would
        # only measure float32 rounding)
        torch.testing.assert_close(params[name].grad, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    model.eval()
    with torch.no_grad():
        scores, losses = model(batch, sample_from=case["sample_from"], compute_loss=False)
    assert losses == {}
    torch.testing.assert_close(scores, case["scores"], rtol=0, atol=1e-5)


def test_float16_features_give_the_same_scores(ref_model_state):
    """Features stay float16 until the model: casting first changes nothing."""
    model = tiny_hardneg(ref_model_state, True).eval()
    case = CASES[0]
    with torch.no_grad():
        s16, _ = model(case["batch"], sample_from="t", compute_loss=False)
        s32, _ = model({**case["batch"], "img_feat": case["batch"]["img_feat"].float()},
                       sample_from="t", compute_loss=False)
    assert torch.equal(s16, s32)


def test_pretraining_checkpoint_and_init_output(txt_db, img_db):
    from data import ItmEvalDataset
    state = load_fixture("ref_pretrain.pt")
    ref = load_fixture("ref_pretrain_out.pt")
    model = UniterForImageTextRetrieval.from_pretrained(TINY_CONFIG, state, img_dim=2048, pairs_num=1)
    model.init_output()
    assert torch.equal(model.rank_output.weight, ref["rank_w"])
    assert torch.equal(model.rank_output.bias, ref["rank_b"])
    # gamma/beta were renamed and loaded
    assert torch.equal(model.uniter.embeddings.LayerNorm.weight, state["uniter.embeddings.LayerNorm.gamma"])
    batch = ItmEvalDataset(txt_db, img_db, 12)[0][0]
    model.eval()
    with torch.no_grad():
        scores, _ = model(batch, compute_loss=False)
    torch.testing.assert_close(scores, ref["scores_text0"], rtol=0, atol=1e-5)


def test_bert_prefix_is_stripped(ref_model_state):
    prefixed = {f"bert.{k}": v for k, v in ref_model_state.items()}
    model = UniterForImageTextRetrieval.from_pretrained(TINY_CONFIG, prefixed, img_dim=2048, pairs_num=1)
    assert torch.equal(model.rank_output.weight, ref_model_state["rank_output.weight"])


def test_missing_and_unexpected_keys_are_logged(ref_model_state, caplog):
    state = dict(ref_model_state)
    del state["rank_output.bias"]
    state["feat_regress.weight"] = torch.zeros(3)
    with caplog.at_level("INFO", logger="model.model"):
        UniterForImageTextRetrieval.from_pretrained(TINY_CONFIG, state, img_dim=2048, pairs_num=1)
    assert "rank_output.bias" in caplog.text and "feat_regress.weight" in caplog.text


def test_a_checkpoint_of_another_layout_logs_a_count_and_a_few_names(ref_model_state, caplog):
    prefixed = {f"wrapper.{k}": v for k, v in ref_model_state.items()}
    with caplog.at_level("INFO", logger="model.model"):
        UniterForImageTextRetrieval.from_pretrained(TINY_CONFIG, prefixed, img_dim=2048, pairs_num=1)
    unused = next(r.getMessage() for r in caplog.records if "not used in" in r.getMessage())
    assert f"{len(prefixed)}: " in unused
    assert unused.count("wrapper.") == 8
    assert unused.endswith(f"... and {len(prefixed) - 8} more")


def test_mismatched_checkpoint_names_first_key_and_shapes(ref_model_state):
    config = UniterConfig.from_json_file(TINY_CONFIG)
    config.hidden_size, config.intermediate_size = 32, 64
    with pytest.raises(CheckpointMismatchError) as err:
        UniterForImageTextRetrieval.from_pretrained(config, ref_model_state, img_dim=2048, pairs_num=1)
    msg = str(err.value)
    assert "uniter.embeddings.word_embeddings.weight" in msg
    assert "(1000, 64)" in msg and "(1000, 32)" in msg
    assert "\n" not in msg


def _expected_keys(n_layers):
    keys = ["uniter.embeddings.word_embeddings.weight", "uniter.embeddings.position_embeddings.weight",
            "uniter.embeddings.token_type_embeddings.weight", "uniter.embeddings.LayerNorm.weight",
            "uniter.embeddings.LayerNorm.bias"]
    for m in ("img_linear", "img_layer_norm", "pos_layer_norm", "pos_linear", "LayerNorm"):
        keys += [f"uniter.img_embeddings.{m}.weight", f"uniter.img_embeddings.{m}.bias"]
    keys.append("uniter.img_embeddings.mask_embedding.weight")
    for i in range(n_layers):
        p = f"uniter.encoder.layer.{i}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
                  "output.dense", "output.LayerNorm"):
            keys += [p + m + ".weight", p + m + ".bias"]
    keys += ["uniter.pooler.dense.weight", "uniter.pooler.dense.bias", "itm_output.weight",
             "itm_output.bias", "rank_output.weight", "rank_output.bias"]
    return set(keys)


@pytest.mark.parametrize("name,layers,hidden,inter", [("base", 12, 768, 3072), ("large", 24, 1024, 4096)])
def test_release_configs_key_and_shape_lists(name, layers, hidden, inter):
    config = UniterConfig.from_json_file(f"config/uniter-{name}.json")
    with torch.device("meta"):
        model = UniterForImageTextRetrievalHardNeg(config, 2048, hard_size=31)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(shapes) == _expected_keys(layers)
    assert shapes["uniter.embeddings.word_embeddings.weight"] == (28996, hidden)
    assert shapes["uniter.embeddings.position_embeddings.weight"] == (512, hidden)
    assert shapes["uniter.img_embeddings.img_linear.weight"] == (hidden, 2048)
    assert shapes["uniter.img_embeddings.pos_linear.weight"] == (hidden, 7)
    assert shapes["uniter.img_embeddings.mask_embedding.weight"] == (2, 2048)
    assert shapes["uniter.encoder.layer.0.intermediate.dense.weight"] == (inter, hidden)
    assert shapes["itm_output.weight"] == (2, hidden) and shapes["rank_output.weight"] == (1, hidden)


def test_length_bucketed_scoring_gives_the_one_pass_scores(ref_model_state):
    """Large no-grad batches are scored in groups of similar length: same scores."""
    model = tiny_hardneg(ref_model_state, True).eval()
    one_pass_model = tiny_hardneg(ref_model_state, True, length_buckets=0).eval()
    g = torch.Generator().manual_seed(0)
    n, tl = 80, 6
    nbbs = torch.randint(10, 40, (n,), generator=g).tolist()
    from data.batch import compact_attn_masks, get_gather_index
    attn = compact_attn_masks([tl] * n, nbbs)
    feat = torch.zeros(n, max(nbbs), 2048)
    pos = torch.zeros(n, max(nbbs), 7)
    for i, k in enumerate(nbbs):
        feat[i, :k] = torch.randn(k, 2048, generator=g)
        pos[i, :k] = torch.rand(k, 7, generator=g)
    batch = {"input_ids": torch.randint(106, 1000, (1, tl), generator=g), "position_ids": torch.arange(tl)[None],
             "img_feat": feat, "img_pos_feat": pos, "attn_masks": attn,
             "gather_index": get_gather_index([tl] * n, nbbs, n, tl, attn.size(1))}
    from model.itm import _length_buckets
    assert len(_length_buckets({**batch, "input_ids": batch["input_ids"].expand(n, -1)}, 32)) == 3
    with torch.no_grad():
        bucketed, _ = model(batch, "t", compute_loss=False)
        one_pass, _ = one_pass_model(batch, "t", compute_loss=False)
    torch.testing.assert_close(bucketed, one_pass, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_first_token_only_equals_the_full_last_layer(ref_model_state, fused):
    """The last layer computed for [CLS] alone gives the [CLS] output and the gradients of
    the full computation."""
    model = tiny_hardneg(ref_model_state, fused).uniter
    g = torch.Generator().manual_seed(1)
    n, tl, nbb = 4, 7, 12
    args = (torch.randint(106, 1000, (n, tl), generator=g), torch.arange(tl)[None],
            torch.randn(n, nbb, 2048, generator=g), torch.rand(n, nbb, 7, generator=g),
            (torch.arange(tl + nbb)[None] < torch.tensor([[19], [15], [12], [17]])).long())
    weights = torch.randn(n, model.config.hidden_size, generator=g)
    outputs, grads = [], []
    for first_only in (False, True):
        model.zero_grad()
        out, losses = model(*args, output_all_encoded_layers=False, first_token_only=first_only)
        assert losses == {}
        out = out[:, 0]
        (out * weights).sum().backward()  # (not a norm: LayerNorm outputs have a fixed one)
        outputs.append(out)
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    # float32 rounding, relative to the gradients' scale (some, like the key biases', are 0
    # in exact arithmetic and hold rounding only)
    scale = max(ref.abs().max().item() for ref in grads[0].values())
    for k, ref in grads[0].items():
        torch.testing.assert_close(grads[1][k], ref, rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("case", [c for c in CASES if c["IAIS"]][:2] + [c for c in CASES if not c["IAIS"]][:2],
                         ids=lambda c: f"{c['sample_from']}-{c['IAIS'] or 'plain'}")
def test_keeping_every_negative_skips_the_scoring_pass(case, ref_model_state):
    """negative_size == hard_neg_size: the loss of the unscored batch equals the loss of
    the scored-and-selected one (same rows, possibly in another order)."""
    batch = {k: (v.float() if k == "img_feat" else v) for k, v in case["batch"].items()}
    n = batch["attn_masks"].size(0)
    model = tiny_hardneg(ref_model_state, True)
    model.hard_size, model.pairs_num = n - 1, n
    model.train()
    calls = []
    model.uniter.register_forward_hook(lambda *_: calls.append(1))
    skipped = model(batch, sample_from=case["sample_from"], IAIS=case["IAIS"])
    assert len(calls) == 1  # the training forward only
    expanded = dict(batch)
    if case["sample_from"] == "t":
        expanded["input_ids"] = batch["input_ids"].expand(n, -1)
    else:
        expanded.update(img_feat=batch["img_feat"].expand(n, -1, -1), img_pos_feat=batch["img_pos_feat"].expand(n, -1, -1))
    with scoring_mode(model):
        scores, _ = super(UniterForImageTextRetrievalHardNeg, model).forward(expanded, compute_loss=False)
    assert model.training
    hard = model.select_hard_batch(expanded, scores, case["sample_from"], bool(case["IAIS"]))
    scored = super(UniterForImageTextRetrievalHardNeg, model).forward(hard, compute_loss=True, IAIS=case["IAIS"])
    assert skipped[1].keys() == scored[1].keys()
    if case["IAIS"]:
        torch.testing.assert_close(skipped[1]["self_attn_loss"], scored[1]["self_attn_loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(skipped[0].sort().values, scored[0].sort().values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_scoring_mode_restores_the_mode_also_after_an_error(training, ref_model_state):
    model = tiny_hardneg(ref_model_state, True).train(training)
    with pytest.raises(RuntimeError), scoring_mode(model):
        assert not model.training and not torch.is_grad_enabled()
        assert not any(m.training for m in model.modules())
        raise RuntimeError("inside")
    assert torch.is_grad_enabled()
    assert all(m.training == training for m in model.modules())


def test_fast_paths_are_fixed_at_construction(ref_model_state):
    assert FastPaths() == FastPaths(fused_attention=True, length_buckets=32, first_token_only=True)
    plain = tiny_hardneg(ref_model_state, False, length_buckets=0, first_token_only=False)
    assert plain.fast_paths == FastPaths.original()
    attention = [m for m in plain.modules() if hasattr(m, "fused_attention")]
    assert len(attention) == 1 + 2 and not any(m.fused_attention for m in attention)  # encoder, 2 layers
    with pytest.raises(ValueError, match="length_buckets"):
        FastPaths(length_buckets=-1)
