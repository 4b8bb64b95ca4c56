"""pyengine's matrix ops against the plain matrix products they must do, timed in one process and interleaved
(benchmarks.harness.time_interleaved): the float16/bfloat16 targets of NOTES.md, "bfloat16 matrix products".

Per case: pyengine's forward (inputs that require grad, as in training) and forward+backward, torch.mm of the
forward's products and of all of them (forward; dx = dy W and dW = dy^T x per layer, random operands of the
same shapes and dtype), and torch's own composition forward+backward. The products write into outputs made once
(torch.mm(..., out=)): their time is the products' alone. A fresh output from glibc may be fresh pages, whose
faults cost as much as a 64-wide product (benchmarks/NOTES.md, session 11), and whether it is depends on what
else the process holds; with fresh outputs mm_all read 0.60 or 1.35 ms from one run to the next. The ratios
printed are pyengine's time over the products' time (fwd/mm_fwd, fb/mm_all) and over torch's (fb/torch_fb).

    python -m benchmarks.products [--cases lce_large,mlp_medium] [--dtype bfloat16] [--budget 3] [--threads N]
"""
import argparse
import contextlib
import math

import torch
import torch.nn.functional as F

import pyengine.functional as PF

from .harness import time_interleaved


def _randn(shape, dtype, grad=False, scale=1.0):
    return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_(grad)


def _lce(n, h, v, dtype):
    """linear_cross_entropy x (n, h), W (v, h): logits = x W^T, dx = dz W, dW = dz^T x."""
    x, w, b = _randn((n, h), dtype, True), _randn((v, h), dtype, True, 1 / math.sqrt(h)), _randn((v,), dtype, True)
    t = torch.randint(0, v, (n,))
    xd, wd, dz, dz_t = x.detach(), w.detach(), _randn((n, v), dtype), _randn((v, n), dtype)
    logits, dx, dw = torch.empty(n, v, dtype=dtype), torch.empty(n, h, dtype=dtype), torch.empty(v, h, dtype=dtype)
    return {
        "fwd": lambda: PF.linear_cross_entropy(x, w, t, linear_bias=b),
        "fb": lambda: torch.autograd.grad(PF.linear_cross_entropy(x, w, t, linear_bias=b), (x, w, b)),
        "mm_fwd": lambda: torch.mm(xd, wd.t(), out=logits),
        "mm_all": lambda: (torch.mm(xd, wd.t(), out=logits), torch.mm(dz, wd, out=dx), torch.mm(dz_t, xd, out=dw)),
        "torch_fb": lambda: torch.autograd.grad(F.cross_entropy(F.linear(x, w, b), t), (x, w, b)),
    }


def _layers(rows, widths, dtype, pyengine_fn, torch_fn):
    """A stack of linear layers rows x widths[0] -> ... -> widths[-1], relu between them."""
    x = _randn((rows, widths[0]), dtype, True)
    ws = [_randn((o, i), dtype, True, 1 / math.sqrt(i)) for i, o in zip(widths, widths[1:])]
    bs = [_randn((o,), dtype, True) for o in widths[1:]]
    params, gy = (x, *ws, *bs), _randn((rows, widths[-1]), dtype)
    acts = [_randn((rows, n), dtype) for n in widths]  # a_l, and dy of the layer below
    acts_t = [a.t().contiguous() for a in acts]
    wd = [w.detach() for w in ws]
    outs = [torch.empty(rows, n, dtype=dtype) for n in widths[1:]]  # a_{l+1}
    dxs = [torch.empty(rows, n, dtype=dtype) for n in widths[:-1]]  # dx of each layer
    dws = [torch.empty_like(w) for w in wd]

    def mm_fwd():
        return [torch.mm(acts[i], wd[i].t(), out=outs[i]) for i in range(len(ws))]

    return {
        "fwd": lambda: pyengine_fn(x, ws, bs),
        "fb": lambda: torch.autograd.grad(pyengine_fn(x, ws, bs), params, gy),
        "mm_fwd": mm_fwd,
        "mm_all": lambda: (mm_fwd(), [torch.mm(acts_t[i + 1], acts[i], out=dws[i]) for i in range(len(ws))],
                           [torch.mm(acts[i + 1], wd[i], out=dxs[i]) for i in range(len(ws))]),
        "torch_fb": lambda: torch.autograd.grad(torch_fn(x, ws, bs), params, gy),
    }


def _torch_mlp(x, ws, bs):
    for i, (w, b) in enumerate(zip(ws, bs)):
        x = F.linear(x, w, b)
        x = torch.relu(x) if i < len(ws) - 1 else x
    return x


def _mlp(rows, widths, dtype):
    return _layers(rows, widths, dtype, lambda x, ws, bs: PF.fused_mlp(x, ws, bs, "relu"), _torch_mlp)


def _linear(rows, k, n, dtype, act=None):
    return _layers(rows, (k, n), dtype, lambda x, ws, bs: PF.linear(x, ws[0], bs[0], activation=act),
                   lambda x, ws, bs: F.relu(F.linear(x, ws[0], bs[0])) if act else F.linear(x, ws[0], bs[0]))


CASES = {
    "lce_large": lambda dt: _lce(4096, 1024, 32000, dt),
    "lce_medium": lambda dt: _lce(1024, 512, 8000, dt),
    "mlp_tiny": lambda dt: _mlp(759, (8, 6, 4, 1), dt),
    "mlp_medium": lambda dt: _mlp(4096, (32, 64, 64, 1), dt),
    "mlp_large": lambda dt: _mlp(65536, (64, 128, 128, 1), dt),
    "linear_medium": lambda dt: _linear(1024, 512, 512, dt),
    "linear_relu_medium": lambda dt: _linear(1024, 512, 512, dt, "relu"),
    "linear_large": lambda dt: _linear(4096, 1024, 1024, dt),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma separated: " + ", ".join(CASES))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per case")
    parser.add_argument("--threads", type=int, default=None, help="torch's thread count (default: as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"{args.dtype}, {torch.get_num_threads()} threads; median ms (spread), ratios")
    for name in args.cases.split(","):
        torch.manual_seed(0)
        res = time_interleaved({k: (f, contextlib.nullcontext) for k, f in CASES[name](dtype).items()}, args.budget)
        t = {k: r["median"] for k, r in res.items()}
        times = "  ".join(f"{k} {v * 1e3:.3f} ({res[k]['spread']:.0%})" for k, v in t.items())
        print(f"{name}: {times}\n    fwd/mm_fwd {t['fwd'] / t['mm_fwd']:.2f}  fb/mm_all {t['fb'] / t['mm_all']:.2f}  "
              f"torch_fb/mm_all {t['torch_fb'] / t['mm_all']:.2f}  fb/torch_fb {t['fb'] / t['torch_fb']:.2f}",
              flush=True)


if __name__ == "__main__":
    main()
