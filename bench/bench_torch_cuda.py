"""The shapes of bench/bench_cuda_ops.cu, measured in torch on the same GPU, for the ratios.

Memory-bound ops (LayerNorm, RMSNorm, SwiGLU, add; forward and backward) in eager mode and,
at the 14B width 5120, under torch.compile, counted with the bytes bench_cuda_ops counts; the bf16 GEMM (fp32
accumulation) in TFLOP/s; causal attention through F.scaled_dot_product_attention on the cuDNN
backend (and flash attention for reference) at the same shapes and FLOP convention (forward
2 b h s^2 d, backward 2.5 times that). Times are CUDA-event medians.

Usage: python3 bench/bench_torch_cuda.py [--iters N]   (scripts/device.sh runs it after
bench_cuda_ops). Without CUDA it prints "no CUDA device: skipped" and exits 0.
"""
from __future__ import annotations

import argparse
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0
    dev = torch.device("cuda")
    bf16 = torch.bfloat16
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, cuDNN "
          f"{torch.backends.cudnn.version()}; {args.iters} iterations (median of CUDA events)")

    def time_ms(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(args.iters):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        times.sort()
        return times[len(times) // 2]

    # ---- memory-bound ops, bytes as bench_cuda_ops counts them
    print(f"\n{'op':16} {'rows':>6} {'cols':>6} {'eager_us':>10} {'GB/s':>8} "
          f"{'compile_us':>10} {'GB/s':>8}")
    rows = 16384
    for cols in (1024, 4096, 5120, 8192):
        x = torch.randn(rows, cols, device=dev, dtype=bf16, requires_grad=True)
        up = torch.randn(rows, cols, device=dev, dtype=bf16, requires_grad=True)
        w = torch.ones(cols, device=dev, dtype=bf16, requires_grad=True)
        b = torch.zeros(cols, device=dev, dtype=bf16, requires_grad=True)
        dy = torch.randn(rows, cols, device=dev, dtype=bf16)
        act, stat, param, grad = rows * cols * 2, rows * 4, cols * 2, cols * 4

        def layernorm(x=x):
            return F.layer_norm(x, (cols,), w, b, 1e-5)

        def rmsnorm(x=x):
            return F.rms_norm(x, (cols,), w, 1e-5)

        def swiglu(x=x):
            return F.silu(x) * up

        def add(x=x):
            return x + up

        cases = [("layernorm", layernorm, 2 * act + 2 * param + 2 * stat,
                  4 * act + 2 * stat + param + 4 * grad),
                 ("rmsnorm", rmsnorm, 2 * act + param + stat, 4 * act + stat + param + 2 * grad),
                 ("swiglu", swiglu, 3 * act, 5 * act),
                 ("add", add, 3 * act, None)]
        for name, fn, fwd_bytes, bwd_bytes in cases:
            # torch.compile only at the 14B width: each compilation takes seconds.
            compiled = torch.compile(fn) if cols == 5120 else None
            for direction, nbytes in (("fwd", fwd_bytes), ("bwd", bwd_bytes)):
                if nbytes is None:
                    continue
                figures = []
                for f in (fn, compiled):
                    if f is None:
                        figures.append((float("nan"), float("nan")))
                        continue
                    if direction == "fwd":
                        with torch.no_grad():
                            ms = time_ms(lambda f=f: f())
                    else:
                        out = f()
                        ms = time_ms(lambda out=out: torch.autograd.grad(
                            out, [x], dy, retain_graph=True))
                    figures.append((ms, nbytes / (ms * 1e-3) / 1e9))
                (eager, eager_gbs), (comp, comp_gbs) = figures
                print(f"{name + '_' + direction:16} {rows:6} {cols:6} {eager * 1e3:10.1f} "
                      f"{eager_gbs:8.1f} {comp * 1e3:10.1f} {comp_gbs:8.1f}")

    # ---- bf16 GEMM y = x w^T
    print(f"\n{'gemm':16} {'M':>6} {'N':>6} {'K':>6} {'time_us':>10} {'TFLOP/s':>9}")
    for m, n, k in ((4096, 4096, 4096), (5120, 15360, 5120)):
        a = torch.randn(m, k, device=dev, dtype=bf16)
        w = torch.randn(n, k, device=dev, dtype=bf16) * 0.05
        ms = time_ms(lambda a=a, w=w: F.linear(a, w))
        print(f"{'bf16 x w^T':16} {m:6} {n:6} {k:6} {ms * 1e3:10.1f} "
              f"{2 * m * n * k / (ms * 1e-3) / 1e12:9.1f}")

    # ---- causal attention, [b, h, s, d] views of [b, s, h, d] tensors (kept's layout)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print(f"\n{'attention':16} {'batch':>5} {'seq':>5} {'heads':>5} {'dim':>5} {'fwd_us':>10} "
          f"{'TFLOP/s':>9} {'bwd_us':>10} {'TFLOP/s':>9}")
    for batch, seq, heads, dim in ((1, 4096, 40, 128), (2, 2048, 16, 128)):
        def view():
            return torch.randn(batch, seq, heads, dim, device=dev, dtype=bf16).transpose(1, 2)
        q, k, v = (view().detach().requires_grad_() for _ in range(3))
        d_o = view()
        flops = 2.0 * batch * heads * seq * seq * dim
        for name, backend in (("torch SDPA cuDNN", SDPBackend.CUDNN_ATTENTION),
                              ("torch SDPA flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    with torch.no_grad():
                        fwd = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    bwd = time_ms(lambda: torch.autograd.grad(out, [q, k, v], d_o, retain_graph=True))
            except RuntimeError as error:
                print(f"{name:16} unavailable: {str(error).splitlines()[0]}")
                continue
            print(f"{name:16} {batch:5} {seq:5} {heads:5} {dim:5} {fwd * 1e3:10.1f} "
                  f"{flops / (fwd * 1e-3) / 1e12:9.1f} {bwd * 1e3:10.1f} "
                  f"{2.5 * flops / (bwd * 1e-3) / 1e12:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
