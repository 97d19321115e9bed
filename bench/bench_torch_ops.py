#!/usr/bin/env python3
"""bench/bench_torch_ops.py: PyTorch CPU timings of the cases kept_ops --bench measures.

kept_ops --bench starts this as a child process and keeps it for the whole run:

    bench_torch_ops.py --serve --threads N --min-reps A --max-reps B --budget-s S

It prints one JSON line {"info": {...}} (or {"error": reason} when torch cannot be imported,
and exits), then answers each request line {"id", "params"} on stdin with {"id", "ms" (the
median), "min_ms", "reps", "discarded", "noisy"} or {"id", "error"}. So every case is timed
in kept and then in torch right after it, under the same machine load. The timing rule is
kept_ops --bench's: warmup (one call, two for calls under 50 ms), then repetitions until min_reps
and the time budget are both reached (at most max_reps), median; repetitions disturbed by
another process are discarded (see measure).

Each op is what a PyTorch user writes, fp32, torch.set_num_threads(threads):
  copy           dst.copy_(src)
  sgemm, linear  F.linear (fwd under no_grad; bwd = autograd.grad wrt x and W)
  norm           F.layer_norm / F.rms_norm (bwd wrt x, weight and bias)
  attention      F.scaled_dot_product_attention(is_causal=True) on [B, H, T, D] views of the
                 [B*T, H*D] projections (no copies; bwd wrt q, k, v)
  attention_layer  q, k, v projections, HF rotate-half RoPE, SDPA, o projection
                 (bwd wrt x and the four weights)
  swiglu         F.silu(g) * u (bwd wrt g and u)
  swiglu_layer   F.linear(F.silu(F.linear(x, Wg)) * F.linear(x, Wu), Wd)
  rope           HF apply_rotary_pos_emb on q [T, H, D]: q * cos + rotate_half(q) * sin
Forward timings run under torch.no_grad(). Backward timings run torch.autograd.grad on a graph
built once (retain_graph=True): the gradients are fresh tensors, where kept's kernels
accumulate into existing ones.
"""

import argparse
import gc
import json
import os
import statistics
import sys
import time


# A repetition during which torch's threads did not get their cores (another process ran) is
# discarded and redone, by kept_ops --bench's rule: the CPU time of the `threads` busiest threads
# of this process, read through the per-thread CPU-time clocks (Linux: (~tid << 3) | 6), must
# be at least MIN_CPU_SHARE x threads x wall time.
MIN_CPU_SHARE = 0.97


def thread_cpu_times():
    out = {}
    for name in os.listdir("/proc/self/task"):
        try:
            out[int(name)] = time.clock_gettime((~int(name) << 3) | 6)
        except OSError:  # the thread ended
            pass
    return out


def cpu_share(before, after, wall, threads):
    deltas = sorted((cpu - before.get(tid, 0.0) for tid, cpu in after.items()), reverse=True)
    return sum(deltas[:threads]) / (wall * threads)


def measure(fn, threads, min_reps, max_reps, budget_s):
    """Returns (median ms, min ms, reps kept, reps discarded, noisy)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first < 0.05:
        fn()
    times, all_times = [], []
    spent = 0.0
    attempts = 0
    while len(times) < max_reps and (len(times) < min_reps or spent < budget_s) and attempts < 4 * max_reps:
        attempts += 1
        c0 = thread_cpu_times()
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter() - t0
        share = cpu_share(c0, thread_cpu_times(), t, threads)
        all_times.append(t)
        if share < MIN_CPU_SHARE:
            continue
        times.append(t)
        spent += t
    discarded = len(all_times) - len(times)
    noisy = len(times) < min_reps
    if noisy:
        times = all_times
    return 1e3 * statistics.median(times), 1e3 * min(times), len(times), discarded, noisy


def rand(torch, *shape, scale=1.0, offset=0.0, grad=False):
    t = (torch.rand(*shape) * 2 - 1) * scale + offset
    return t.requires_grad_(grad)


def rope_tables(torch, seq, head_dim, theta):
    # HF LlamaRotaryEmbedding: inv_freq in fp32, angle = p * inv_freq, cos/sin of cat(f, f).
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(torch, x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def make_case(torch, F, params):
    """Returns a zero-argument callable that runs the case once."""
    kind = params["kind"]
    direction = params.get("dir", "fwd")
    grad = direction == "bwd"

    def backward(out, inputs):
        dout = rand(torch, *out.shape)
        return lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)

    if kind == "copy":
        n = params["bytes"] // 4
        src, dst = torch.ones(n), torch.zeros(n)
        return lambda: dst.copy_(src)
    if kind == "sgemm":
        a = rand(torch, params["m"], params["k"])
        b = rand(torch, params["n"], params["k"])
        return lambda: F.linear(a, b)
    if kind == "linear":
        x = rand(torch, params["tokens"], params["in"], grad=grad)
        w = rand(torch, params["out"], params["in"], scale=0.02, grad=grad)
        if not grad:
            return lambda: F.linear(x, w)
        return backward(F.linear(x, w), (x, w))
    if kind == "norm":
        rows, cols, eps = params["rows"], params["cols"], params["eps"]
        x = rand(torch, rows, cols, offset=0.3, grad=grad)
        w = rand(torch, cols, scale=0.2, offset=1.0, grad=grad)
        if params["norm"] == "layernorm":
            b = rand(torch, cols, scale=0.1, grad=grad)
            fn = lambda: F.layer_norm(x, (cols,), w, b, eps)
            inputs = (x, w, b)
        else:
            if hasattr(F, "rms_norm"):
                fn = lambda: F.rms_norm(x, (cols,), w, eps)
            else:  # HF LlamaRMSNorm
                fn = lambda: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
            inputs = (x, w)
        return backward(fn(), inputs) if grad else fn
    if kind == "attention":
        b, t, h, d = params["batch"], params["seq"], params["heads"], params["head_dim"]
        q, k, v = (rand(torch, b * t, h * d, grad=grad) for _ in range(3))

        def fn():
            heads = [m.view(b, t, h, d).transpose(1, 2) for m in (q, k, v)]
            return F.scaled_dot_product_attention(*heads, is_causal=True)

        return backward(fn(), (q, k, v)) if grad else fn
    if kind == "attention_layer":
        b, t, h, d = params["batch"], params["seq"], params["heads"], params["head_dim"]
        hidden = h * d
        x = rand(torch, b * t, hidden, grad=grad)
        ws = [rand(torch, hidden, hidden, scale=0.02, grad=grad) for _ in range(4)]
        cos, sin = rope_tables(torch, t, d, params["theta"])
        cos, sin = cos[:, None, :], sin[:, None, :]

        def fn():
            q, k, v = (F.linear(x, w).view(b, t, h, d) for w in ws[:3])
            q = q * cos + rotate_half(torch, q) * sin
            k = k * cos + rotate_half(torch, k) * sin
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            )
            return F.linear(o.transpose(1, 2).reshape(b * t, hidden), ws[3])

        return backward(fn(), (x, *ws)) if grad else fn
    if kind == "swiglu":
        g = rand(torch, params["rows"], params["cols"], scale=4.0, grad=grad)
        u = rand(torch, params["rows"], params["cols"], grad=grad)
        fn = lambda: F.silu(g) * u
        return backward(fn(), (g, u)) if grad else fn
    if kind == "swiglu_layer":
        t, hidden, inter = params["tokens"], params["hidden"], params["intermediate"]
        x = rand(torch, t, hidden, grad=grad)
        wg = rand(torch, inter, hidden, scale=0.02, grad=grad)
        wu = rand(torch, inter, hidden, scale=0.02, grad=grad)
        wd = rand(torch, hidden, inter, scale=0.02, grad=grad)
        fn = lambda: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
        return backward(fn(), (x, wg, wu, wd)) if grad else fn
    if kind == "rope":
        t, h, d = params["tokens"], params["heads"], params["head_dim"]
        q = rand(torch, t, h, d)
        cos, sin = rope_tables(torch, t, d, params["theta"])
        cos, sin = cos[:, None, :], sin[:, None, :]
        return lambda: q * cos + rotate_half(torch, q) * sin
    raise ValueError(f"unknown case kind {kind!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--min-reps", type=int, default=5)
    parser.add_argument("--max-reps", type=int, default=25)
    parser.add_argument("--budget-s", type=float, default=1.5)
    args = parser.parse_args()

    def answer(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    try:
        import torch
        import torch.nn.functional as F
    except Exception as error:  # torch missing or broken: say why, the C++ side goes on
        answer({"error": f"torch is not importable: {error}"})
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    answer(
        {
            "info": {
                "version": torch.__version__,
                "threads": torch.get_num_threads(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "mkl": torch.backends.mkl.is_available(),
                "mkldnn": torch.backends.mkldnn.is_available(),
            }
        }
    )
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        params = request["params"]
        try:
            fn = make_case(torch, F, params)
            rule = (args.threads, args.min_reps, args.max_reps, args.budget_s)
            if params.get("dir", "fwd") == "fwd":
                with torch.no_grad():
                    ms, min_ms, reps, discarded, noisy = measure(fn, *rule)
            else:
                ms, min_ms, reps, discarded, noisy = measure(fn, *rule)
            answer(
                {
                    "id": request["id"],
                    "ms": ms,
                    "min_ms": min_ms,
                    "reps": reps,
                    "discarded": discarded,
                    "noisy": noisy,
                }
            )
        except Exception as error:  # report and go on with the next case
            answer({"id": request["id"], "error": f"{type(error).__name__}: {error}"})
        fn = None
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
