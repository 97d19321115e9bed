#!/usr/bin/env python3
"""Writes tests/data/train_reference.json: torch.optim.AdamW trajectories and transformers'
cosine-with-warmup learning rates, the third-party reference for tests/unit/test_train.cpp.

Run it with the parity venv (scripts/python_env.sh; the C++ test needs no Python, the output is
committed):

    ~/.cache/kept/venv/bin/python tests/python/make_adamw_reference.py

AdamW: small parameters (fewer than 16 elements, so torch's CPU kernels take their scalar
paths) in two parameter groups, weight decay on one and not the other, as kept's role rule
does; a parameter whose gradient is None for the first steps (torch skips it, and its own step
count starts later); the lr changes every step; torch's defaults; and beta1 < 0.5 (the other
branch of torch's lerp). Gradients are fp32 from a seeded generator. The JSON holds the inputs,
the parameters after every step and the final exp_avg / exp_avg_sq / step of each parameter.
All values are fp32 numbers written as Python floats, which round-trip exactly.

Schedules: the lr torch's LambdaLR gives at each step for transformers'
get_cosine_schedule_with_warmup, and get_cosine_with_min_lr_schedule_with_warmup (min_lr > 0).
"""

import json
import os

import torch
import transformers
from transformers import get_cosine_schedule_with_warmup
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "data", "train_reference.json")


def schedule_values(peak, warmup, total, min_lr=None):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=peak)
    if min_lr is None:
        sched = get_cosine_schedule_with_warmup(opt, warmup, total)
    else:
        sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr=min_lr)
    values = []
    for _ in range(total):
        values.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return {"peak_lr": peak, "warmup_steps": warmup, "total_steps": total,
            "min_lr": 0.0 if min_lr is None else min_lr, "values": values}


def adamw_case(name, seed, specs, steps, lrs, betas, eps, weight_decay):
    """specs: (name, role, shape, decay, first_step_with_grad, grad_scale)."""
    gen = torch.Generator().manual_seed(seed)
    params, decay, no_decay, info = [], [], [], []
    for pname, role, shape, decays, first, scale in specs:
        init = torch.randn(shape, generator=gen, dtype=torch.float32)
        p = torch.nn.Parameter(init.clone())
        params.append(p)
        (decay if decays else no_decay).append(p)
        grads = []
        for step in range(steps):
            g = torch.randn(shape, generator=gen, dtype=torch.float32) * scale
            grads.append(g if step >= first else None)
        info.append({"name": pname, "role": role, "shape": list(shape), "decay": decays,
                     "init": init.flatten().tolist(),
                     "grads": [None if g is None else g.flatten().tolist() for g in grads]})
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    # foreach/fused off: pin the single-tensor path (the one torch takes for CPU tensors anyway).
    opt = torch.optim.AdamW(groups, lr=lrs[0], betas=betas, eps=eps, foreach=False, fused=False)
    trajectory = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lrs[step]
        for p, meta in zip(params, info):
            g = meta["grads"][step]
            p.grad = None if g is None else torch.tensor(g, dtype=torch.float32).reshape(p.shape)
        opt.step()
        trajectory.append([p.detach().flatten().tolist() for p in params])
    final = []
    for p in params:
        state = opt.state.get(p, {})
        final.append({
            "exp_avg": state["exp_avg"].flatten().tolist() if state else None,
            "exp_avg_sq": state["exp_avg_sq"].flatten().tolist() if state else None,
            "step": int(state["step"].item()) if state else 0,
        })
    return {"name": name, "lr": lrs, "beta1": betas[0], "beta2": betas[1], "eps": eps,
            "weight_decay": weight_decay, "params": info, "trajectory": trajectory,
            "final": final}


def main():
    cosine = schedule_values(1e-2, 2, 8)["values"]
    cases = [
        adamw_case(
            "groups_frozen_and_schedule", 1234,
            [("w", "weight", (2, 3), True, 0, 1.0),
             ("b", "bias", (3,), False, 0, 0.5),
             ("n", "norm_weight", (4,), False, 0, 2.0),
             ("e", "embedding", (3, 2), True, 0, 1e-3),
             ("late", "weight", (5,), True, 3, 10.0)],
            8, cosine, (0.9, 0.95), 1e-8, 0.1),
        adamw_case(
            "torch_defaults", 99,
            [("p", "weight", (7,), True, 0, 1.0)],
            5, [1e-3] * 5, (0.9, 0.999), 1e-8, 1e-2),
        adamw_case(
            "small_beta1", 7,
            [("p", "weight", (2, 2), True, 0, 0.1),
             ("q", "norm_bias", (3,), False, 0, 1.0)],
            4, [0.05, 0.03, 0.02, 0.01], (0.3, 0.8), 1e-6, 0.05),
    ]
    schedules = [
        schedule_values(3e-4, 10, 100),
        schedule_values(1.0, 0, 7),
        schedule_values(1e-3, 4, 4),
        schedule_values(1e-3, 5, 50, min_lr=1e-5),
    ]
    doc = {
        "generator": "tests/python/make_adamw_reference.py",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "adamw": cases,
        "schedules": schedules,
    }
    with open(OUT, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.normpath(OUT)} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
