"""The PyTorch side of benches/gpu/compare.sh: the ops of `sgdm bench` at the same cases (read from
`sgdm bench --list`), on the same kinds of random data, timed the same way (median of --runs calls after
--warmup, CUDA events on a GPU). What a PyTorch user gets:

  conv            F.conv2d / aten.convolution_backward (cuDNN), NCHW and channels-last
  attention       F.scaled_dot_product_attention on [B, H, L, d] (its fastest layout), autograd backward
  groupnorm_silu  F.silu(F.group_norm(...)), autograd backward
  lstm            nn.LSTM(input, hidden, layers, bidirectional, batch_first) (cuDNN), autograd backward
  infonce         F.normalize, matmul / temperature, cross_entropy both ways, autograd backward

Also measures the same peaks as sgdm (an 8192^3 GEMM, a 2^28-element copy; smaller on the CPU).
Writes JSON: {"device", "dtype", "torch", "peak_gemm_flops", "peak_copy_bytes_per_s", "rows": [{id, pass,
variant, ms, min_ms, max_ms}]}.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

parser = argparse.ArgumentParser()
parser.add_argument("--cases", required=True, help="JSON from `sgdm bench --list`")
parser.add_argument("--json", required=True, help="where to write the rows")
parser.add_argument("--device", default="cuda")
parser.add_argument("--dtype", default=None, help="bfloat16 or float32 [default: bfloat16 on cuda, float32 on cpu]")
parser.add_argument("--warmup", type=int, default=5)
parser.add_argument("--runs", type=int, default=30)
args = parser.parse_args()
dev = torch.device(args.device)
dt = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
torch.manual_seed(0)
if dev.type == "cuda":
    torch.backends.cudnn.benchmark = True  # let cuDNN pick its fastest algorithm, as tuned users do


def timed(f):
    """(median, min, max) milliseconds of f() over args.runs calls after args.warmup."""
    for _ in range(args.warmup):
        f()
    ms = []
    if dev.type == "cuda":
        torch.cuda.synchronize()
        events = []
        for _ in range(args.runs):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            f()
            e.record()
            events.append((s, e))
        torch.cuda.synchronize()
        ms = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(args.runs):
            t = time.perf_counter()
            f()
            ms.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ms), min(ms), max(ms)


def rand(*shape, grad=False):
    return (torch.rand(*shape, device=dev, dtype=dt) * 2 - 1).requires_grad_(grad)


def conv(p):
    n, c, s = p["batch"], p["channels"], p["side"]
    out = []
    for variant, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
        x, dy = rand(n, c, s, s).to(memory_format=fmt), rand(n, c, s, s).to(memory_format=fmt)
        w, b = rand(c, c, 3, 3).to(memory_format=fmt), rand(c)

        def backward(mask):
            return lambda: torch.ops.aten.convolution_backward(dy, x, w, [c], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)

        out.append(("forward", variant, timed(lambda: F.conv2d(x, w, b, padding=1))))
        out.append(("backward_input", variant, timed(backward([True, False, False]))))
        out.append(("backward_weight", variant, timed(backward([False, True, False]))))
    return out


def attention(p):
    b, h, lq, lk, d = p["batch"], p["heads"], p["q_len"], p["kv_len"], p["head_dim"]
    q, k, v = rand(b, h, lq, d, grad=True), rand(b, h, lk, d, grad=True), rand(b, h, lk, d, grad=True)
    dout = rand(b, h, lq, d)
    with torch.no_grad():
        fwd = timed(lambda: F.scaled_dot_product_attention(q, k, v))
    o = F.scaled_dot_product_attention(q, k, v)
    bwd = timed(lambda: torch.autograd.grad(o, (q, k, v), dout, retain_graph=True))
    return [("forward", "sdpa", fwd), ("backward", "sdpa", bwd)]


def groupnorm_silu(p):
    n, c, s, g = p["batch"], p["channels"], p["side"], p["groups"]
    x, dy = rand(n, c, s, s, grad=True), rand(n, c, s, s)
    w, b = rand(c, grad=True), rand(c, grad=True)
    with torch.no_grad():
        fwd = timed(lambda: F.silu(F.group_norm(x, g, w, b, 1e-5)))
    y = F.silu(F.group_norm(x, g, w, b, 1e-5))
    bwd = timed(lambda: torch.autograd.grad(y, (x, w, b), dy, retain_graph=True))
    return [("forward", "group_norm+silu", fwd), ("backward", "group_norm+silu", bwd)]


def lstm(p):
    b, t, i, h, layers = p["batch"], p["steps"], p["input"], p["hidden"], p["layers"]
    net = torch.nn.LSTM(i, h, layers, bidirectional=True, batch_first=True).to(dev, dt).train()
    x, dy = rand(b, t, i, grad=True), rand(b, t, 2 * h)
    fwd = timed(lambda: net(x))  # training-mode forward: keeps what backward needs, as ours does
    y, _ = net(x)
    bwd = timed(lambda: torch.autograd.grad(y, [x, *net.parameters()], dy, retain_graph=True))
    return [("forward", "nn.LSTM", fwd), ("backward", "nn.LSTM", bwd)]


def infonce(p):
    bsz, d = p["batch"], p["dim"]
    a, b = rand(bsz, d, grad=True), rand(bsz, d, grad=True)
    labels = torch.arange(bsz, device=dev)

    def loss():
        logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / 0.07
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    fwd = timed(loss)
    value = loss()
    bwd = timed(lambda: torch.autograd.grad(value, (a, b), retain_graph=True))
    return [("forward", "composition", fwd), ("backward", "composition", bwd)]


def peaks():
    n = 8192 if dev.type == "cuda" else 1024
    a = rand(n, n)
    gemm = timed(lambda: a @ a)[1]
    m = (1 << 28) if dev.type == "cuda" else (1 << 24)
    x, y = torch.zeros(m, device=dev, dtype=dt), torch.empty(m, device=dev, dtype=dt)
    copy = timed(lambda: y.copy_(x))[1]
    return 2 * n**3 / (gemm * 1e-3), 2 * m * x.element_size() / (copy * 1e-3)


runners = {"conv": conv, "attention": attention, "groupnorm_silu": groupnorm_silu, "lstm": lstm, "infonce": infonce}
cases = json.load(open(args.cases))
gemm, copy = peaks()
print(f"torch {torch.__version__} on {dev} {dt}: peaks GEMM {gemm / 1e12:.1f} TFLOP/s, copy {copy / 1e9:.0f} GB/s", flush=True)
rows = []
for case in cases:
    for pass_, variant, (ms, lo, hi) in runners[case["family"]](case["params"]):
        rows.append({"id": case["id"], "pass": pass_, "variant": variant, "ms": ms, "min_ms": lo, "max_ms": hi})
        print(f"{case['id']:<52} {pass_:<16} {variant:<16} {ms:10.4f} ms", flush=True)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
doc = {
    "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
    "dtype": str(dt).replace("torch.", ""),
    "torch": torch.__version__,
    "peak_gemm_flops": gemm,
    "peak_copy_bytes_per_s": copy,
    "rows": rows,
}
json.dump(doc, open(args.json, "w"), indent=1)
