#!/usr/bin/env python3
"""The compact optimizer states against fp32 over a whole XKD-logit run, on `device: cuda`.

    compact_states_curves.py KEPT_BIN OUT_DIR [--hidden 64 --layers 2 ...] [--time-only]

Four runs of the same job, differing only in the job's "memory" field:

    fp32              optimizer_states fp32, master_weights fp32 (the reference)
    int8              optimizer_states int8, master_weights fp32
    no-masters        optimizer_states fp32, master_weights none (bf16, stochastic rounding)
    int8-no-masters   optimizer_states int8, master_weights none

and a fifth, cpu-fp32, the same job on the CPU backend (fp32 weights and activations): what
changing only the arithmetic's precision does to the curve, a floor to read the others against.
Then `kept compare` draws the curves (OUT_DIR/compact_states_200_steps.png) and prints its
table, and the runs are judged against the bounds tests/python/test_memory_plan.py states for
CI: int8 worst per-step |loss - loss_fp32| / loss_fp32[0] <= 1e-3 and its last-20 mean within
5%; no masters worst per-step |loss / loss_fp32 - 1| <= 5%. The same two per-step figures are
also given on 20-step moving means (OUT_DIR/judgement.json has them all).

The job is the demo's XKD-logit recovery (reference/cmd_demo.cpp: its corpus and 2000-piece
tokenizer, an Orion teacher pretrained with cross-entropy and converted to Llama with OPM
"paper", lr 1e-3 to 1e-4 after 10 warmup steps, no weight decay) at a size the CUDA backend's
host emulation can run 4 x 200 steps of in about 25 minutes on 2 cores. The demo's own model
(4 layers x 128, 16 x 128 tokens a step) takes 67 s a step there, 15 hours for the four runs, and
6-7 s a step even at 64 tokens (the emulated optimizer and per-layer kernels cost per step, not
per token); the default is the demo's vocabulary (2000) and head count at 2 layers x 64
(intermediate 176, the demo's ratio) and 2 x 32 tokens a step. --time-only times the four
variants with `kept train --synthetic` (same shapes, random weights) and projects the total, which
is how that size was chosen.

Master weights "none" exists only where parameters are bf16, so every run is on `device: cuda`
(a KEPT_CUDA_EMULATION build runs it on the CPU). Only the standard library is used. The kept
binary is copied into OUT_DIR first, so rebuilding it does not disturb the runs; a run that was
interrupted resumes from its last checkpoint when the script is run again, and a finished one is
kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

VARIANTS = {
    "fp32": {"optimizer_states": "fp32", "master_weights": "fp32"},
    "int8": {"optimizer_states": "int8", "master_weights": "fp32"},
    "no-masters": {"optimizer_states": "fp32", "master_weights": "none"},
    "int8-no-masters": {"optimizer_states": "int8", "master_weights": "none"},
}
# The same job on the CPU backend (fp32 weights and activations): how far the loss of one small
# batch moves when only the arithmetic's precision changes, the floor the per-step figures of
# the variants are read against.
FLOOR = "cpu-fp32"
# The CI bounds (tests/python/test_memory_plan.py).
INT8_ABS_TOLERANCE = 1e-3
INT8_TAIL_TOLERANCE = 0.05
NO_MASTER_LOSS_TOLERANCE = 0.05
TAIL = 20


def run(cmd: list, log: Path | None = None, threads: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    print("+", " ".join(map(str, cmd)), flush=True)
    if log is None:
        proc = subprocess.run(list(map(str, cmd)), env=env, text=True, capture_output=True)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(map(str, cmd))} failed (status {proc.returncode}):\n"
                     + proc.stderr[-3000:])
        return proc
    with log.open("w") as out:
        proc = subprocess.run(list(map(str, cmd)), env=env, text=True, stdout=out,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed (status {proc.returncode}); see {log}:\n"
                 + log.read_text()[-3000:])
    return proc


def train_losses(output: Path) -> list[float]:
    path = output / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["loss"] for r in records if r["type"] == "train"]


def setup(kept: Path, out: Path, args) -> tuple[Path, Path, Path, Path]:
    """The demo's corpus and tokenizer, a teacher of the chosen size pretrained on them as the
    demo pretrains its own, and its OPM-paper Llama conversion. Returns (corpus, tokenizer,
    teacher, student)."""
    demo = out / "demo"
    corpus, tokenizer = demo / "corpus.txt", demo / "tokenizer" / "tokenizer.model"
    if not tokenizer.is_file():
        # Only the corpus and the tokenizer are used; --scale 0.01 keeps its own training short.
        run([kept, "demo", "--scale", "0.01", "--output", demo, "--force"], out / "demo.log")
    config = json.loads((demo / "teacher-config.json").read_text())
    config.update(hidden_size=args.hidden, intermediate_size=args.intermediate,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads,
                  num_key_value_heads=args.heads)
    (out / "teacher-config.json").write_text(json.dumps(config, indent=1))
    teacher = out / "teacher"
    if not (teacher / "final" / "config.json").is_file():
        # The demo's teacher pretraining (reference/cmd_demo.cpp, step 3), on the CPU.
        job = {"objective": "ce", "device": "cpu",
               "init": {"config": str(out / "teacher-config.json"), "seed": 1},
               "tokenizer": str(tokenizer),
               "data": {"train": str(corpus), "held_out_fraction": 0.02, "seq_len": 128},
               "batch_size": 16, "steps": args.teacher_steps,
               "optimizer": {"lr": 3e-3, "weight_decay": 0.1},
               "schedule": {"warmup_steps": min(50, args.teacher_steps), "min_lr": 3e-4},
               "eval": {"every": 0, "max_batches": 8}, "checkpoint": {"every": 0, "keep": 1},
               "log_every": 50, "output": str(teacher), "output_dtype": "f32"}
        path = out / "jobs" / "teacher.json"
        path.write_text(json.dumps(job, indent=1))
        shutil.rmtree(teacher, ignore_errors=True)
        run([kept, "train", path], out / "logs" / "teacher.log")
    student = out / "llama-paper"
    if not (student / "config.json").is_file():
        shutil.rmtree(student, ignore_errors=True)
        run([kept, "convert", teacher / "final", student, "--opm", "paper"],
            out / "logs" / "convert.log")
    return corpus, tokenizer, teacher / "final", student


def xkd_job(args, corpus: Path, teacher: Path, student: Path, output: Path, memory: dict,
            device: str = "cuda") -> dict:
    # The demo's XKD-logit recovery (reference/cmd_demo.cpp, step 5) at the chosen size.
    return {"objective": "xkd-logit", "device": device, "student": str(student),
            "teacher": str(teacher),
            "data": {"train": str(corpus), "held_out_fraction": 0.02, "seq_len": args.seq},
            "batch_size": args.batch, "steps": args.steps,
            "optimizer": {"lr": 1e-3, "weight_decay": 0.0},
            "schedule": {"warmup_steps": min(10, args.steps), "min_lr": 1e-4},
            "eval": {"every": 0, "max_batches": 4},
            "checkpoint": {"every": 50, "keep": 1}, "log_every": 10,
            "memory": memory, "output": str(output), "output_dtype": "f32"}


def time_variants(kept: Path, out: Path, args, corpus, teacher, student) -> None:
    total = 0.0
    for name, memory in VARIANTS.items():
        path = out / "jobs" / f"time-{name}.json"
        path.write_text(json.dumps(xkd_job(args, corpus, teacher, student,
                                           out / "never-written", memory), indent=1))
        text = run([kept, "train", path, "--synthetic", "--steps", 3], threads=1).stdout
        line = next(x for x in text.splitlines() if "median" in x)
        seconds = float(line.split("; step ")[1].split(" s")[0])
        total += seconds * args.steps
        print(f"{name}: {seconds:.2f} s a step -> {seconds * args.steps / 60:.1f} min", flush=True)
    print(f"four runs of {args.steps} steps, one after the other: {total / 60:.1f} min "
          f"(with --parallel {args.parallel}: about {total / 60 / args.parallel:.1f} min on an "
          f"idle machine)")


def train_variant(kept: Path, out: Path, name: str, job: dict, threads: int) -> float:
    output = Path(job["output"])
    if len(train_losses(output)) == job["steps"] and (output / "final").is_dir():
        print(f"{name}: already finished", flush=True)
        return 0.0
    path = out / "jobs" / f"{name}.json"
    path.write_text(json.dumps(job, indent=1))
    start = time.monotonic()
    # --resume: an interrupted run continues from its last checkpoint (or starts at step 0).
    run([kept, "train", path, "--resume"], out / "logs" / f"{name}.log", threads=threads)
    seconds = time.monotonic() - start
    print(f"{name}: {job['steps']} steps in {seconds / 60:.1f} min", flush=True)
    return seconds


def moving_mean(values: list[float], points: int = TAIL) -> list[float]:
    return [sum(values[i - points:i]) / points for i in range(points, len(values) + 1)]


def judge(out: Path, steps: int) -> list[dict]:
    curves = {name: train_losses(out / "runs" / name) for name in [*VARIANTS, FLOOR]}
    reference = curves["fp32"]
    rows = []
    for name, losses in curves.items():
        assert len(losses) == steps, (name, len(losses))
        worst_abs = max(abs(a - b) for a, b in zip(losses, reference)) / reference[0]
        tail = sum(losses[-TAIL:]) / sum(reference[-TAIL:]) - 1
        worst_ratio = max(abs(a / b - 1) for a, b in zip(losses, reference))
        # The same two per-step figures on 20-step moving means: each step's loss is one small
        # batch's, so a per-step figure mixes that batch's sensitivity into the drift.
        smooth, smooth_ref = moving_mean(losses), moving_mean(reference)
        row = {"run": name, "worst_abs": worst_abs, "tail": tail, "worst_ratio": worst_ratio,
               "worst_step_abs": 1 + max(range(steps), key=lambda i: abs(losses[i] - reference[i])),
               "worst_step_ratio": 1 + max(range(steps),
                                           key=lambda i: abs(losses[i] / reference[i] - 1)),
               "smooth_worst_abs": max(abs(a - b) for a, b in zip(smooth, smooth_ref))
               / reference[0],
               "smooth_worst_ratio": max(abs(a / b - 1) for a, b in zip(smooth, smooth_ref))}
        if "int8" in name:
            row["int8_bounds"] = (worst_abs <= INT8_ABS_TOLERANCE
                                  and abs(tail) <= INT8_TAIL_TOLERANCE)
        if "no-masters" in name:
            row["no_master_bound"] = worst_ratio <= NO_MASTER_LOSS_TOLERANCE
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kept", type=Path, help="the kept binary (a KEPT_CUDA_EMULATION build)")
    parser.add_argument("out", type=Path, help="output directory (reused when run again)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=176)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--parallel", type=int, default=2,
                        help="runs at a time (the emulator is single-threaded: one core each)")
    parser.add_argument("--time-only", action="store_true",
                        help="time one step of each variant (--synthetic) and project the total")
    args = parser.parse_args()

    out = args.out.resolve()
    for sub in ("jobs", "logs", "runs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    kept = out / "kept"
    shutil.copy2(args.kept, kept)
    corpus, _, teacher, student = setup(kept, out, args)
    if args.time_only:
        time_variants(kept, out, args, corpus, teacher, student)
        return

    jobs = {name: xkd_job(args, corpus, teacher, student, out / "runs" / name, memory)
            for name, memory in VARIANTS.items()}
    start = time.monotonic()
    threads = 1 if args.parallel > 1 else 2
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        list(pool.map(lambda item: train_variant(kept, out, item[0], item[1], threads),
                      jobs.items()))
    print(f"four runs: {(time.monotonic() - start) / 60:.1f} min wall", flush=True)
    train_variant(kept, out, FLOOR, xkd_job(args, corpus, teacher, student, out / "runs" / FLOOR,
                                            {}, device="cpu"), threads=2)

    runs = [out / "runs" / name for name in [*VARIANTS, FLOOR]]
    chart = out / "compact_states_200_steps.png"
    table = run([kept, "compare", *runs, "--out", chart]).stdout
    report = json.loads(run([kept, "compare", *runs, "--out", chart, "--json"]).stdout)
    (out / "compare.json").write_text(json.dumps(report, indent=1))
    print(table)
    rows = judge(out, args.steps)
    (out / "judgement.json").write_text(json.dumps(rows, indent=1))
    print(f"| run | worst \\|diff\\| / fp32[0] (int8 bound {INT8_ABS_TOLERANCE:g}) | last 20 vs "
          f"fp32 (int8 bound {INT8_TAIL_TOLERANCE:.0%}) | worst per-step \\|ratio - 1\\| "
          f"(no-masters bound {NO_MASTER_LOSS_TOLERANCE:.0%}) | 20-step moving means: worst "
          f"\\|diff\\| / fp32[0], worst \\|ratio - 1\\| | within the bounds that apply |")
    print("|---|---|---|---|---|---|")
    notes = {"fp32": "(reference)", FLOOR: "(precision floor: no bound)"}
    for row in rows:
        verdicts = [("int8: " + ("yes" if row["int8_bounds"] else "NO")) if "int8_bounds" in row
                    else "",
                    ("no masters: " + ("yes" if row["no_master_bound"] else "NO"))
                    if "no_master_bound" in row else ""]
        where = (f" (step {row['worst_step_abs']})", f" (step {row['worst_step_ratio']})")
        if row["run"] == "fp32":
            where = ("", "")
        print(f"| {row['run']} | {row['worst_abs']:.2e}{where[0]} | {row['tail']:+.2%} | "
              f"{row['worst_ratio']:.4f}{where[1]} | {row['smooth_worst_abs']:.2e}, "
              f"{row['smooth_worst_ratio']:.4f} | "
              f"{', '.join(v for v in verdicts if v) or notes.get(row['run'], '')} |")


if __name__ == "__main__":
    main()
