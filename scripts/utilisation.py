"""How close UNITER runs to the machine's own limit: model FLOPs per second of scoring and
of the hard-negative training step, divided by the dense matmul rate of the same host
measured in the same run (fp32 on a CPU, bf16 on a GPU)."""
import torch

from scripts.bench_common import device_sync, hard_negative_model, synthetic_batch, train_loss, without_dropout
from scripts.timing import rate


def forward_flops_per_pair(config, txt_len, num_bb, img_dim=2048):
    """Matmul FLOPs of scoring one pair: the box and position projections, every layer on
    every position except the last one, which computes keys and values for all positions
    and the rest for [CLS] alone, then the pooler and the ranking head. ``txt_len`` and
    ``num_bb`` may be arrays (broadcast)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    seq = txt_len + num_bb
    full_layer = seq * (4 * h * h + 2 * h * inter) + 2 * seq * seq * h
    last_layer = seq * 2 * h * h + (2 * h * h + 2 * h * inter) + 2 * seq * h
    return 2 * ((layers - 1) * full_layer + last_layer + num_bb * (img_dim + 7) * h + h * h + h)


def train_step_flops(config, n, hard, txt_len, num_bb):
    """Model FLOPs of one hard-negative step: ``n`` pairs scored without gradients (no
    scoring pass when every negative is kept), then ``hard + 1`` trained, whose backward
    counts twice their forward (the usual convention; the IAIS loss is left out, it is
    under 1% of a layer)."""
    forward = forward_flops_per_pair(config, txt_len, num_bb)
    scored = n if n != hard + 1 else 0
    return forward * (scored + 3 * (hard + 1))


def matmul_rate(device, dtype, min_time, sizes=(1024, 2048, 4096)):
    """Dense matmul FLOP/s in ``dtype`` on ``device`` with every thread PyTorch uses: the best
    of square products of ``sizes`` (which size runs fastest depends on the machine's
    caches), the machine's practical limit for this model's matmuls."""
    sync = device_sync(device)
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)

        def product():
            torch.mm(a, b)
            sync()

        best = max(best, 2 * size ** 3 * rate(product, min_time))
    return best


def bench_utilisation(device, config, min_time, n=16, hard=3, txt_len=22, num_bb=60):
    """UNITER (``config``) at the release's lengths (22 tokens, 60 boxes) on ``device``: no-grad
    scoring of ``n`` pairs and one IAIS hard-negative step (score ``n``, train ``hard`` + 1),
    fp32 on a CPU and bf16 autocast on a GPU, as model FLOP/s and as a share of the dense
    matmul rate measured here."""
    config = without_dropout(config)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sync = device_sync(device)
    batch = synthetic_batch(config, device, n, txt_len, num_bb)
    iais_batch = {k: v for k, v in batch.items() if k != "gather_index"}
    model = hard_negative_model(config, device, hard, True)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def score():
        with torch.no_grad(), autocast:
            model.eval()(batch, "t", compute_loss=False)
        sync()

    def train_step():
        model.train().zero_grad()
        with autocast:
            loss = train_loss(model, iais_batch, "singular")
        loss.backward()
        sync()

    peak = matmul_rate(device, dtype, min_time)
    score_flops = n * rate(score, min_time) * forward_flops_per_pair(config, txt_len, num_bb)
    train_flops = rate(train_step, min_time) * train_step_flops(config, n, hard, txt_len, num_bb)
    tag = "bf16" if dtype == torch.bfloat16 else "fp32"
    return {f"util_{device.type}_matmul_{tag}_gflops": peak / 1e9,
            f"util_{device.type}_score_{tag}_gflops": score_flops / 1e9,
            f"util_{device.type}_train_iais_{tag}_gflops": train_flops / 1e9,
            f"util_{device.type}_score_{tag}_of_matmul": score_flops / peak,
            f"util_{device.type}_train_iais_{tag}_of_matmul": train_flops / peak}
