#!/usr/bin/env python3
"""Training-step throughput: `kept train` on the CPU vs the same step in PyTorch CPU.

One run measures both, per objective, one after the other (so both see the same machine load),
and reports tokens/s and the ratio kept / torch (> 1: kept is faster).

The models (the same on both sides, weights included):
  student  LlamaForCausalLM      hidden 256, 4 layers, 8 heads, intermediate 688, vocab 2000
  teacher  StableLmForCausalLM   the same sizes; partial_rotary_factor 1, use_qkv_bias False,
                                 use_parallel_residual False, qk_layernorm False, MHA: the
                                 Orion computation (LayerNorm with bias)
written by `kept init` (fp32) from config.json files this script writes, and loaded into
transformers with from_pretrained (fp32, attn_implementation "sdpa").

The step (batch 8 x seq 128 tokens, all positions are targets):
  ce         cross-entropy of the student's next-token logits
  xkd-logit  KL(p_teacher || p_student) per token, temperature 1, mean over tokens; the teacher
             forward is part of the step (no grad)
then backward, gradient clipping at norm 1 (kept always computes the norm), and AdamW
(lr 1e-4, betas 0.9/0.95, eps 1e-8, weight decay 0.1 on matrices and the embedding, none on
norms: kept's defaults). torch: torch.set_num_threads(THREADS), zero_grad(set_to_none=True), KL
computed the standard way in fp32 (log_softmax of both, F.kl_div(log_target=True)), AdamW's
default implementation (--torch-adamw fused|foreach to change it).

kept: `kept train JOB.json` with OMP_NUM_THREADS = OPENBLAS_NUM_THREADS = THREADS, data = a
generated corpus tokenized by a `kept tokenizer` model. The trainer logs the cumulative
tokens_per_second after each step in metrics.jsonl; the steady-state rate is taken between
step WARMUP and the last step, (T_b - T_a) / (T_b / r_b - T_a / r_a), so process start, model
loading, tokenizing and the first steps are excluded. torch is timed the same way: WARMUP
steps untimed, then STEPS steps.

Usage: bench_train.py [--kept PATH] [--objectives ce,xkd-logit] [--steps 30] [--warmup 5]
                      [--threads 2] [--json PATH] [--workdir DIR] [--torch-adamw default]
Run with the parity venv's python (~/.cache/kept/venv/bin/python).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO_ROOT = Path(__file__).resolve().parents[1]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def find_kept(explicit: str | None) -> Path:
    candidates = [explicit] if explicit else [
        os.environ.get("KEPT_BIN", ""),
        str(REPO_ROOT / "build" / "reference" / "kept"),
        str(REPO_ROOT / "build-bc" / "reference" / "kept"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    sys.exit(f"bench_train: the kept binary was not found (tried {candidates}); pass --kept PATH")


def kept_env(threads: int) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["OPENBLAS_NUM_THREADS"] = str(threads)
    return env


def run(cmd: list, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env,
                          errors="replace", check=False)
    if proc.returncode != 0:
        sys.exit(f"bench_train: `{' '.join(map(str, cmd))}` failed ({proc.returncode})\n"
                 f"--- stderr ---\n{proc.stderr[-4000:]}\n--- stdout ---\n{proc.stdout[-2000:]}")
    return proc


# ---- inputs ----------------------------------------------------------------------------------


def pseudo_corpus(path: Path, seed: int, words: int = 6000, documents: int = 1500) -> None:
    """Text with a rich vocabulary (pseudo-words from syllables) so that a 2,000-piece BPE
    tokenizer trains on it."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    lexicon = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(words)]
    weights = [1.0 / (rank + 1) for rank in range(words)]  # Zipf-like
    docs = []
    for _ in range(documents):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            sentence = " ".join(rng.choices(lexicon, weights, k=rng.randint(6, 18)))
            sentences.append(sentence.capitalize() + ".")
        docs.append(" ".join(sentences))
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")


def write_configs(root: Path, a: argparse.Namespace) -> tuple[Path, Path]:
    from transformers import LlamaConfig, StableLmConfig

    common = dict(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter,
                  num_hidden_layers=a.layers, num_attention_heads=a.heads,
                  num_key_value_heads=a.heads, max_position_embeddings=max(512, a.seq),
                  rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    student = root / "student-config"
    LlamaConfig(rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False, **common).save_pretrained(student)
    teacher = root / "teacher-config"
    StableLmConfig(layer_norm_eps=1e-5, hidden_act="silu", partial_rotary_factor=1.0,
                   use_qkv_bias=False, use_parallel_residual=False, qk_layernorm=False,
                   **common).save_pretrained(teacher)
    return student / "config.json", teacher / "config.json"


# ---- kept --------------------------------------------------------------------------------------


def steady_tokens_per_second(records: list[dict], warmup: int) -> tuple[float, int, float]:
    """From the cumulative tokens_per_second the trainer logs: (rate between step `warmup` and
    the last step, steps in that window, seconds of that window)."""
    train = [r for r in records if r.get("type") == "train"]
    if len(train) < warmup + 2:
        raise SystemExit(f"bench_train: only {len(train)} train records; need > warmup + 1")
    first, last = train[warmup - 1] if warmup > 0 else None, train[-1]
    t_last = last["tokens"] / last["tokens_per_second"]
    if first is None:
        return last["tokens_per_second"], len(train), t_last
    t_first = first["tokens"] / first["tokens_per_second"]
    seconds = t_last - t_first
    return (last["tokens"] - first["tokens"]) / seconds, last["step"] - first["step"], seconds


def kept_run(kept: Path, root: Path, objective: str, a: argparse.Namespace) -> dict:
    output = root / f"kept-{objective}"
    job = {
        "objective": objective,
        "student": str(root / "student"),
        "tokenizer": str(root / "tok" / "tokenizer.model"),
        "data": {"train": str(root / "corpus.txt"), "held_out_fraction": 0.0, "seq_len": a.seq,
                 "seed": 0},
        "batch_size": a.batch,
        "steps": a.warmup + a.steps,
        "optimizer": {"lr": a.lr, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
                      "weight_decay": a.weight_decay},
        "schedule": {"warmup_steps": 0, "min_lr": a.lr},
        "clip_grad_norm": 1.0,
        "temperature": 1.0,
        "eval": {"every": 0, "max_batches": 1},
        "checkpoint": {"every": 0, "keep": 1},
        "output": str(output),
    }
    if objective != "ce":
        job["teacher"] = str(root / "teacher")
    job_path = root / f"job-{objective}.json"
    job_path.write_text(json.dumps(job, indent=1), encoding="utf-8")
    load_before = loadavg()
    start = time.perf_counter()
    run([kept, "train", job_path, "--force"], env=kept_env(a.threads))
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    rate, steps, seconds = steady_tokens_per_second(records, a.warmup)
    train = [r for r in records if r.get("type") == "train"]
    return {"tokens_per_second": rate, "timed_steps": steps, "timed_seconds": seconds,
            "process_wall_seconds": wall, "first_loss": train[0]["loss"],
            "last_loss": train[-1]["loss"], "loadavg_before": load_before,
            "loadavg_after": loadavg()}


# ---- torch -------------------------------------------------------------------------------------


def torch_run(root: Path, objective: str, a: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM, StableLmForCausalLM

    def load(cls, directory: Path):
        model, loading = cls.from_pretrained(directory, dtype=torch.float32,
                                             attn_implementation="sdpa", output_loading_info=True)
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
            if loading.get(key):
                sys.exit(f"bench_train: loading {directory} into {cls.__name__}: {key} = "
                         f"{loading[key]}")
        return model

    torch.manual_seed(0)
    student = load(LlamaForCausalLM, root / "student").train()
    teacher = None
    if objective != "ce":
        teacher = load(StableLmForCausalLM, root / "teacher").eval()
        teacher.requires_grad_(False)
    decay = [p for p in student.parameters() if p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.ndim < 2]
    kwargs = {}
    if a.torch_adamw == "fused":
        kwargs["fused"] = True
    elif a.torch_adamw == "foreach":
        kwargs["foreach"] = True
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr, betas=(0.9, 0.95), eps=1e-8, **kwargs)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=generator)
               for _ in range(8)]
    temperature = 1.0

    def step(i: int) -> float:
        ids = batches[i % len(batches)]
        inputs, targets = ids[:, :-1], ids[:, 1:]
        optimizer.zero_grad(set_to_none=True)
        logits = student(input_ids=inputs, use_cache=False).logits
        if objective == "ce":
            loss = F.cross_entropy(logits.float().reshape(-1, a.vocab), targets.reshape(-1))
        else:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=inputs, use_cache=False).logits
            log_p_student = F.log_softmax(logits.float().reshape(-1, a.vocab) / temperature, dim=-1)
            log_p_teacher = F.log_softmax(teacher_logits.float().reshape(-1, a.vocab) / temperature,
                                          dim=-1)
            tokens = log_p_student.shape[0]
            loss = F.kl_div(log_p_student, log_p_teacher, log_target=True,
                            reduction="sum") / tokens * temperature**2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        return loss.item()

    load_before = loadavg()
    losses = [step(i) for i in range(a.warmup)]
    times = []
    start = time.perf_counter()
    for i in range(a.warmup, a.warmup + a.steps):
        t0 = time.perf_counter()
        losses.append(step(i))
        times.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - start
    tokens = a.steps * a.batch * a.seq
    return {"tokens_per_second": tokens / seconds, "timed_steps": a.steps,
            "timed_seconds": seconds, "step_median_ms": 1e3 * statistics.median(times),
            "first_loss": losses[0], "last_loss": losses[-1], "loadavg_before": load_before,
            "loadavg_after": loadavg()}


# ---- main ------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kept", help="the kept binary (default: $KEPT_BIN, build/reference/kept)")
    p.add_argument("--objectives", default="ce,xkd-logit")
    p.add_argument("--steps", type=int, default=30, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--inter", type=int, default=688)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--torch-adamw", choices=("default", "foreach", "fused"), default="default")
    p.add_argument("--repeats", type=int, default=1,
                   help="kept/torch pairs per objective; the best of each side is reported")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--workdir", help="keep the models and runs here (default: a temp dir)")
    a = p.parse_args()
    objectives = [o for o in a.objectives.split(",") if o]
    for o in objectives:
        if o not in ("ce", "xkd-logit"):
            sys.exit(f"bench_train: objective {o!r}: this benchmark runs ce and xkd-logit")
    if a.warmup < 1:
        sys.exit("bench_train: --warmup must be >= 1")

    import torch
    import transformers

    torch.set_num_threads(a.threads)
    transformers.utils.logging.disable_progress_bar()
    kept = find_kept(a.kept)
    root = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="kept-bench-train-"))
    root.mkdir(parents=True, exist_ok=True)
    info = {
        "benchmark": "bench_train",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "threads": a.threads,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_adamw": a.torch_adamw,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "kept": str(kept),
        "model": {"hidden": a.hidden, "layers": a.layers, "heads": a.heads, "inter": a.inter,
                  "vocab": a.vocab},
        "batch": a.batch, "seq": a.seq, "tokens_per_step": a.batch * a.seq,
        "warmup_steps": a.warmup, "timed_steps": a.steps,
        "loadavg_start": loadavg(),
    }
    print(f"bench_train: {info['cpu']}, {a.threads} threads; torch {torch.__version__} "
          f"(get_num_threads {torch.get_num_threads()}, AdamW {a.torch_adamw}), transformers "
          f"{transformers.__version__}; kept {kept}", flush=True)
    print(f"model: hidden {a.hidden}, {a.layers} layers, {a.heads} heads, intermediate {a.inter}, "
          f"vocab {a.vocab}; batch {a.batch} x seq {a.seq} = {a.batch * a.seq} tokens/step; "
          f"{a.warmup} warmup + {a.steps} timed steps; load {info['loadavg_start']}", flush=True)

    try:
        pseudo_corpus(root / "corpus.txt", seed=0)
        run([kept, "tokenizer", "--input", root / "corpus.txt", "--vocab-size", a.vocab,
             "--output", root / "tok"], env=kept_env(a.threads))
        student_config, teacher_config = write_configs(root, a)
        run([kept, "init", "--config", student_config, root / "student", "--seed", 1, "--dtype",
             "f32", "--force"], env=kept_env(a.threads))
        run([kept, "init", "--config", teacher_config, root / "teacher", "--seed", 2, "--dtype",
             "f32", "--force"], env=kept_env(a.threads))

        results = []
        for objective in objectives:
            best_kept, best_torch = None, None
            for repeat in range(a.repeats):
                print(f"{objective}: kept train ... (repeat {repeat + 1}/{a.repeats})", flush=True)
                k = kept_run(kept, root, objective, a)
                print(f"  kept  {k['tokens_per_second']:8.0f} tok/s  (load {k['loadavg_before']} "
                      f"-> {k['loadavg_after']})", flush=True)
                print(f"{objective}: torch ...", flush=True)
                t = torch_run(root, objective, a)
                print(f"  torch {t['tokens_per_second']:8.0f} tok/s  (load {t['loadavg_before']} "
                      f"-> {t['loadavg_after']})", flush=True)
                if best_kept is None or k["tokens_per_second"] > best_kept["tokens_per_second"]:
                    best_kept = k
                if best_torch is None or t["tokens_per_second"] > best_torch["tokens_per_second"]:
                    best_torch = t
            results.append({"objective": objective, "kept": best_kept, "torch": best_torch,
                            "ratio": best_kept["tokens_per_second"] / best_torch["tokens_per_second"]})
        info["loadavg_end"] = loadavg()
        info["results"] = results

        print(f"\n{'objective':<10} {'kept tok/s':>10} {'torch tok/s':>11} {'kept/torch':>10} "
              f"{'kept ms/step':>12} {'torch ms/step':>13} {'loss@1 kept/torch':>18}  "
              f"load kept | torch")
        for r in results:
            k, t = r["kept"], r["torch"]
            step_tokens = a.batch * a.seq
            print(f"{r['objective']:<10} {k['tokens_per_second']:10.0f} {t['tokens_per_second']:11.0f} "
                  f"{r['ratio']:10.2f} {1e3 * step_tokens / k['tokens_per_second']:12.1f} "
                  f"{1e3 * step_tokens / t['tokens_per_second']:13.1f} "
                  f"{k['first_loss']:8.4f}/{t['first_loss']:<9.4f}  "
                  f"{k['loadavg_before']} | {t['loadavg_before']}")
        print(f"\nsteady state over {a.steps} steps after {a.warmup} warmup steps; kept/torch > 1: "
              f"kept is faster. loss@1: the first step's loss on each side (same weights, "
              f"different token batches: kept's packed corpus, torch's random ids). torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"transformers {transformers.__version__}, sdpa, fp32. Load average at end: "
              f"{info['loadavg_end']}")
        if a.json:
            Path(a.json).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            print(f"wrote {a.json}")
    finally:
        if not a.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
