"""The reference trainer through the CLI: `kept train JOB.json`, `kept eval`, against HF.

A tiny random `StableLmForCausalLM` (the Orion computation: LayerNorm with bias, full rotary,
sequential residual; every parameter re-drawn so norms, biases and the embedding mean are not
HF's trivial init) is the teacher; `kept convert` makes the Llama students; a SentencePiece
tokenizer is trained with `kept tokenizer` on generated text (no demo corpus needed). Then:

1. resume: a run SIGKILLed at several moments (before its first checkpoint, between checkpoints,
   while a checkpoint directory is being written) and resumed with --resume logs the same
   (step, loss_exact) sequence and writes the same final safetensors bytes as an uninterrupted
   run; resuming a finished run changes nothing.
2. norm-only (the report's Appendix-A pilot): RMSNorm weights initialised at random and trained
   full-batch on the "opm-l2" loss converge to the closed form w* that `kept opm` reports on the
   same tokens; with too few steps they do not.
3. every objective (xkd-logit, xkd-logit-mse, xkd-hidden, ce) runs end to end and lowers its
   loss; the final model loads in transformers' LlamaForCausalLM and matches `kept forward`.
4. an exact conversion starts at zero: xkd-logit ~0 when b_final = 0, xkd-hidden ~0 against the
   centred teacher.
5. bad input fails with a non-zero status and a message naming the file and the field, and
   loses nothing: empty / non-UTF-8 / JSONL-without-"text" corpora, a tokenizer larger than the
   model, teacher/student mismatches, an unknown job field, a NaN loss (the last good checkpoint
   is named and resumable), a full disk while writing a checkpoint (RLIMIT_FSIZE), an output
   directory that already holds a run.
6. `kept eval` perplexity, KL, top-1 agreement and perplexity by context length agree with the
   same figures computed here with HF on the same packed tokens.
7. `"device": "cuda"` (the CUDA backend; emulated on the CPU in a KEPT_CUDA_EMULATION build) trains
   the same job, says on its first line which device it runs on, and resumes bit-exactly after a
   SIGKILL.

The kept binary: env KEPT_BIN (ctest sets it), else build/reference/kept under the repository.
kept runs single-threaded here (OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=1): the models are tiny,
and on 2 shared cores spinning worker threads cost more than they give.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file
from transformers import StableLmForCausalLM

import kept_testing
from kept_testing import (
    Shape,
    generated_documents,
    hf_logits,
    kept_env,
    load_llama,
    make_config,
    make_orion_source,
    relative_error,
    split_documents,
    write_corpus,
    write_ids,
)

KEPT_TIMEOUT_S = 120
KEPT_THREADS = 1
POLL_S = 0.0003  # how often a watched run's files are looked at

VOCAB, HIDDEN, HEADS, INTER, LAYERS = 400, 32, 4, 64, 2
EPS, THETA, MAX_POS = 1e-5, 1e4, 128
SHAPE = Shape(vocab=VOCAB, hidden=HIDDEN, heads=HEADS, inter=INTER, layers=LAYERS, theta=THETA,
              eps=EPS, max_pos=MAX_POS)
TOKENIZER_VOCAB = 384  # <= VOCAB; SentencePiece needs > 259 + the corpus' characters
SEQ = 32
LOGIT_REL_TOL = 1e-4  # HF vs kept forward: max |diff| <= tol * max |HF|
EVAL_REL_TOL = 1e-4  # kept eval vs HF

CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "trainer.json")


# ---------------------------------------------------------------------------------------------
# the kept binary
# ---------------------------------------------------------------------------------------------


# kept runs single-threaded here, under a shorter time limit (see the module docstring).
KEPT_RUN = dict(timeout_s=KEPT_TIMEOUT_S, threads=KEPT_THREADS)
run_kept = functools.partial(kept_testing.run_kept, **KEPT_RUN)
expect_failure = functools.partial(kept_testing.expect_failure, **KEPT_RUN)
kept_logits = functools.partial(kept_testing.kept_logits, **KEPT_RUN)


# ---------------------------------------------------------------------------------------------
# models, tokenizer, text
# ---------------------------------------------------------------------------------------------

WORDS = ("the of and to in is was for on with as by at from that this model layer norm bias "
         "weight token residual stream mean centre fold convert llama orion rotary attention "
         "gate up down head vocabulary calibration café naïve 한국어 文章").split()


def save_model(model, directory: Path, tokenizer: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    shutil.copyfile(tokenizer, directory / "tokenizer.model")
    return directory


def kept_init_llama(kept: Path, directory: Path, *, vocab: int, hidden: int) -> Path:
    """A random Llama checkpoint written by `kept init` (no tokenizer.model in it)."""
    config_dir = directory.parent / f"{directory.name}-config"
    make_config("llama", dataclasses.replace(SHAPE, vocab=vocab, hidden=hidden)).save_pretrained(
        config_dir)
    run_kept(kept, "init", "--config", config_dir / "config.json", directory, "--seed", 3,
             "--dtype", "f32")
    return directory


@dataclass
class World:
    root: Path
    corpus: Path  # 60 generated documents
    tokenizer: Path  # kept tokenizer on the corpus, TOKENIZER_VOCAB pieces
    teacher: Path  # StableLM, b_final != 0
    teacher_model: StableLmForCausalLM
    teacher0: Path  # StableLM, b_final = 0
    paper: Path  # kept convert --opm paper of teacher
    exact: Path  # kept convert --opm exact of teacher
    exact0: Path  # kept convert --opm exact of teacher0


@pytest.fixture(scope="module")
def world(tmp_path_factory, kept_bin) -> World:
    root = tmp_path_factory.mktemp("trainer")
    corpus = write_corpus(root / "corpus.txt", generated_documents(1, 60, WORDS))
    run_kept(kept_bin, "tokenizer", "--input", corpus, "--vocab-size", TOKENIZER_VOCAB,
             "--output", root / "tok")
    tokenizer = root / "tok" / "tokenizer.model"
    teacher_model = make_orion_source(SHAPE, 11)
    teacher = save_model(teacher_model, root / "teacher", tokenizer)
    teacher0 = save_model(make_orion_source(SHAPE, 12, zero_final_bias=True), root / "teacher0",
                          tokenizer)
    students = {}
    for name, source, mode in (("paper", teacher, "paper"), ("exact", teacher, "exact"),
                               ("exact0", teacher0, "exact")):
        students[name] = root / name
        run_kept(kept_bin, "convert", source, students[name], "--opm", mode)
    return World(root, corpus, tokenizer, teacher, teacher_model, teacher0, **students)


# ---------------------------------------------------------------------------------------------
# jobs, runs, metrics, checkpoints
# ---------------------------------------------------------------------------------------------


def merged(base: dict, changes: dict) -> dict:
    result = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def base_job(world: World, output: Path) -> dict:
    return {
        "objective": "xkd-logit",
        "student": str(world.paper),
        "teacher": str(world.teacher),
        "data": {"train": str(world.corpus), "held_out_fraction": 0.1, "seq_len": SEQ, "seed": 3},
        "batch_size": 4,
        "steps": 20,
        "optimizer": {"lr": 3e-3, "weight_decay": 0.0},
        "schedule": {"warmup_steps": 0, "min_lr": 0.0},
        "eval": {"every": 0, "max_batches": 2},
        "checkpoint": {"every": 0, "keep": 2},
        "output": str(output),
    }


def write_job(path: Path, job: dict) -> Path:
    path.write_text(json.dumps(job, indent=1), encoding="utf-8")
    return path


# The job of the resume, NaN and full-disk tests: everything that carries state across a
# checkpoint is on (grad accumulation, weight decay, warmup, cosine to a floor, periodic eval,
# checkpoint pruning).
RESUME_CHANGES = {
    "grad_accum": 2,
    "steps": 15,
    "optimizer": {"lr": 3e-3, "weight_decay": 0.1},
    "schedule": {"warmup_steps": 2, "min_lr": 3e-4},
    "eval": {"every": 5, "max_batches": 2},
    "checkpoint": {"every": 3, "keep": 2},
}


def resume_job(world: World, name: str) -> tuple[Path, Path]:
    output = world.root / name
    job = write_job(world.root / f"{name}.json", merged(base_job(world, output), RESUME_CHANGES))
    return job, output


def read_metrics(output: Path) -> list[dict]:
    records = []
    for line in (output / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        records.append(json.loads(line))
    return records


def train_trace(output: Path) -> list[tuple[int, str]]:
    return [(r["step"], r["loss_exact"]) for r in read_metrics(output) if r["type"] == "train"]


def eval_trace(output: Path) -> list[dict]:
    return [r for r in read_metrics(output) if r["type"] == "eval"]


def logged_train_steps(output: Path) -> list[int]:
    """Train steps in metrics.jsonl as a running process leaves it (a line may be cut short)."""
    try:
        text = (output / "metrics.jsonl").read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    steps = []
    for line in text.split("\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("type") == "train":
            steps.append(record["step"])
    return steps


def complete_checkpoints(output: Path) -> dict[int, Path]:
    directory = output / "checkpoints"
    if not directory.is_dir():
        return {}
    result = {}
    for p in directory.iterdir():
        m = re.fullmatch(r"step-(\d+)", p.name)
        if m and all((p / f).is_file() for f in CHECKPOINT_FILES):
            result[int(m[1])] = p
    return result


def checkpoint_debris(output: Path) -> set[str]:
    directory = output / "checkpoints"
    if not directory.is_dir():
        return set()
    return {p.name for p in directory.iterdir() if re.match(r"\.step-\d+\.tmp-", p.name)}


def assert_loadable_checkpoint(path: Path, step: int) -> None:
    state = json.loads((path / "trainer.json").read_text())
    assert state["format"] == "kept-trainer-state" and state["step"] == step, state
    for name in ("model.safetensors", "optimizer.safetensors"):
        tensors = load_file(str(path / name))
        assert tensors, f"{path / name} holds no tensor"
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        assert not bad, f"{path / name}: non-finite {bad}"


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


class Watched:
    """A `kept train` started in the background, its output in a log file."""

    def __init__(self, kept: Path, job: Path, *flags, log: Path, ignore_sigxfsz: bool = False):
        self.log = log
        cmd = [str(kept), "train", str(job), *map(str, flags)]
        if ignore_sigxfsz:  # so that exceeding RLIMIT_FSIZE fails write() with EFBIG
            cmd = ["bash", "-c", "trap '' XFSZ; exec \"$@\"", "bash", *cmd]
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                         env=kept_env(KEPT_THREADS))
        self.deadline = time.monotonic() + KEPT_TIMEOUT_S

    def output_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def kill_when(self, condition) -> bool:
        """SIGKILLs the run as soon as condition() holds; False if it ended before that."""
        while True:
            if condition():
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait()
                return self.proc.returncode == -signal.SIGKILL
            if self.proc.poll() is not None:
                return False
            if time.monotonic() > self.deadline:
                self.proc.kill()
                pytest.fail(f"kept train did not finish in {KEPT_TIMEOUT_S} s:\n{self.output_text()}")
            time.sleep(POLL_S)

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"kept train did not finish in {KEPT_TIMEOUT_S} s:\n{self.output_text()}")


RESUMING = re.compile(r"resuming \S+ from (\S+) \(step (\d+)\)")


def resumed_from(text: str) -> int | None:
    """The step a --resume run says it continued from (0: no checkpoint, started over)."""
    m = RESUMING.search(text)
    if m:
        return int(m[2])
    return 0 if "no checkpoint in" in text else None


@pytest.fixture(scope="module")
def reference_run(world, kept_bin) -> Path:
    """The resume job, uninterrupted."""
    job, output = resume_job(world, "reference")
    run_kept(kept_bin, "train", job)
    return output


# ---------------------------------------------------------------------------------------------
# 1. resume after SIGKILL is bit-exact
# ---------------------------------------------------------------------------------------------


def test_resume_after_sigkill_is_bit_exact(world, kept_bin, reference_run):
    job, output = resume_job(world, "killed")
    reference = train_trace(reference_run)
    assert [s for s, _ in reference] == list(range(1, 16))
    logs = iter(world.root / f"killed-{i}.log" for i in range(100))
    events = []

    def start(resume: bool) -> tuple[Watched, int | None]:
        before = max(complete_checkpoints(output), default=0)
        run = Watched(kept_bin, job, *(["--resume"] if resume else []), log=next(logs))
        return run, before if resume else None

    def check_resume_point(run: Watched, expected: int | None):
        if expected is None:
            return
        got = resumed_from(run.output_text())
        assert got == expected, f"resumed from step {got}, the newest checkpoint is {expected}:\n" \
                                f"{run.output_text()}"

    def metrics_identity():
        try:
            return (output / "metrics.jsonl").stat().st_ino
        except FileNotFoundError:
            return None

    def logged_at_least(step: int):
        """True once the run started after this call (not the one before it: a resume rewrites
        metrics.jsonl under a new inode) has logged `step`."""
        old = metrics_identity()
        return lambda: (metrics_identity() not in (None, old)
                        and max(logged_train_steps(output), default=0) >= step)

    # (a) killed before the first checkpoint (step 3) was written
    condition = logged_at_least(1)
    run, expected = start(resume=False)
    assert run.kill_when(condition), run.output_text()
    events.append(("after step 1", max(logged_train_steps(output), default=0),
                   max(complete_checkpoints(output), default=0)))

    def kill_resumed_after(step: int):
        """Resumes the run and kills it once it has logged `step`."""
        condition = logged_at_least(step)
        run, expected = start(resume=True)
        assert run.kill_when(condition), run.output_text()
        check_resume_point(run, expected)
        events.append((f"after step {step}", max(logged_train_steps(output)),
                       max(complete_checkpoints(output), default=0)))

    # (b) killed between two checkpoints, with steps logged past the newest one
    kill_resumed_after(4)

    # (c) killed while a checkpoint directory is being written: its temporary name is there,
    # the step-N name is not. Retried at the next checkpoint if the write was already done.
    mid_checkpoint = False
    for _ in range(6):
        debris = checkpoint_debris(output)  # left by earlier kills
        run, expected = start(resume=True)
        fresh = lambda: checkpoint_debris(output) - debris  # noqa: E731
        killed = run.kill_when(lambda: bool(fresh()))
        assert killed, f"the run ended before writing a checkpoint:\n{run.output_text()}"
        check_resume_point(run, expected)
        left = fresh()
        steps = {int(re.match(r"\.step-(\d+)", name)[1]) for name in left}
        if left and not any(s in complete_checkpoints(output) for s in steps):
            mid_checkpoint = True
            events.append((f"writing checkpoint {sorted(steps)}", max(logged_train_steps(output)),
                           max(complete_checkpoints(output), default=0)))
            break
    assert mid_checkpoint, "could not kill the run while it was writing a checkpoint"

    # (d) killed once more between checkpoints, after old ones have been pruned
    kill_resumed_after(13)

    # (e) to the end
    run, expected = start(resume=True)
    assert run.wait() == 0, run.output_text()
    check_resume_point(run, expected)

    print(f"[resume] kills (moment, last logged step, newest checkpoint): {events}")
    # the kills were where they were meant to be: one before any checkpoint, one with steps
    # logged past the newest checkpoint (those lines must be dropped on resume)
    assert events[0][2] == 0, events
    assert events[1][2] >= 3 and events[1][1] > events[1][2], events
    assert train_trace(output) == reference
    assert eval_trace(output) == eval_trace(reference_run)
    final = (output / "final" / "model.safetensors").read_bytes()
    assert final == (reference_run / "final" / "model.safetensors").read_bytes(), \
        "the resumed run's final model differs from the uninterrupted run's"
    for step in (12, 15):
        for name in CHECKPOINT_FILES[:2]:
            a = output / "checkpoints" / f"step-{step:06d}" / name
            b = reference_run / "checkpoints" / f"step-{step:06d}" / name
            assert a.read_bytes() == b.read_bytes(), f"{a} differs from {b}"
    assert sorted(complete_checkpoints(output)) == [12, 15]  # keep = 2


def test_resuming_a_finished_run_changes_nothing(world, kept_bin, tmp_path):
    """Deterministic stand-in for a kill between the final evaluation and the end of the run:
    the run resumes from its last checkpoint (the last step), evaluates and saves again."""
    output = tmp_path / "finished"
    job = write_job(tmp_path / "job.json", merged(base_job(world, output), {
        "steps": 6, "checkpoint": {"every": 3}, "eval": {"every": 3}}))
    run_kept(kept_bin, "train", job)
    metrics = (output / "metrics.jsonl").read_text()
    final = (output / "final" / "model.safetensors").read_bytes()
    proc = run_kept(kept_bin, "train", job, "--resume")
    assert resumed_from(proc.stderr) == 6, proc.stderr
    assert (output / "metrics.jsonl").read_text() == metrics, \
        "resuming a finished run rewrote its metrics (a duplicated final eval record?)"
    assert (output / "final" / "model.safetensors").read_bytes() == final


# ---------------------------------------------------------------------------------------------
# 2. norm-only from random weights converges to the OPM closed form
# ---------------------------------------------------------------------------------------------


def one_document(tokenizer: Path, windows: int) -> str:
    """Text whose stream (tokens + EOS) gives T tokens with T % SEQ != 0: then the trainer's
    (T-1) // SEQ windows [i SEQ, i SEQ + SEQ) are exactly `kept opm`'s T // SEQ calibration
    sequences (kept opm cuts the same stream into whole sequences, the trainer needs one more
    token per window for its last target)."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    rng = random.Random(5)
    words = []
    while True:
        words.append(rng.choice(WORDS))
        text = " ".join(words)
        tokens = len(sp.encode(text)) + 1
        if tokens > windows * SEQ and tokens % SEQ != 0:
            assert (tokens - 1) // SEQ == tokens // SEQ == windows
            return text


def norm_weights(path: Path) -> dict[str, torch.Tensor]:
    return {k[:-len(".weight")]: v.double() for k, v in load_file(str(path)).items()
            if k.endswith("layernorm.weight") or k == "model.norm.weight"}


def worst_relative_error(w: dict[str, torch.Tensor], w_star: dict[str, torch.Tensor]) -> float:
    assert set(w) == set(w_star), (sorted(w), sorted(w_star))
    return max(((w[s] - w_star[s]).abs().max() / w_star[s].abs().max()).item() for s in w_star)


# Full-batch Adam on the separable convex quadratic L(w) = sum_i c_i (w_i - w*_i)^2 + const
# converges to w*; what is left after the run comes from the finite number of steps (Adam's
# steps are ~lr in size, so it reaches w* after ~|w0 - w*| / lr steps and then hovers at a
# distance that shrinks with the annealed rate) and from fp32 (w, gradients and the norm
# outputs are single precision: ~1e-7 relative per value). Measured with lr 0.05, cosine to 0,
# no clipping, on this model: 300 steps 8.9e-7, 200 steps 2.8e-5, 50 steps 0.06, 20 steps 0.39.
# Tolerance 1e-4: two orders of magnitude above what 300 steps reach, far below the distance of
# the random start (> 0.2) and of a short run.
NORM_ONLY_STEPS, NORM_ONLY_FEW_STEPS, NORM_ONLY_LR, NORM_ONLY_TOL = 300, 20, 0.05, 1e-4


def test_norm_only_converges_to_the_opm_closed_form(world, kept_bin, tmp_path):
    windows = 8
    doc = tmp_path / "one-document.txt"
    doc.write_text(one_document(world.tokenizer, windows) + "\n", encoding="utf-8")
    report = tmp_path / "opm.json"
    run_kept(kept_bin, "opm", world.teacher, "--data", doc, "--seq-len", SEQ, "--tokens", 10**6,
             "--report", report)
    rep = json.loads(report.read_text())
    assert rep["tokens"] == windows * SEQ, "kept opm did not calibrate on the trainer's windows"
    w_star = {s["site"]: torch.tensor(s["w_star"], dtype=torch.float64) for s in rep["sites"]}
    assert len(w_star) == 2 * LAYERS + 1

    def train(name: str, steps: int, warmup: int = 0) -> Path:
        output = tmp_path / name
        job = merged(base_job(world, output), {
            "objective": "norm-only",
            "data": {"train": str(doc), "held_out_fraction": 0.0},
            "batch_size": windows,  # the whole document every step: deterministic full batch
            "steps": steps,
            "optimizer": {"lr": NORM_ONLY_LR, "weight_decay": 0.0},
            "schedule": {"warmup_steps": warmup, "min_lr": 0.0},
            "clip_grad_norm": 0,
            "norm_only": {"loss": "opm-l2", "init": "random", "seed": 4},
            "output_dtype": "f32",
        })
        run_kept(kept_bin, "train", write_job(tmp_path / f"{name}.json", job))
        return output

    # the random start: one step at lr(0) = 0 (warmup) leaves the weights where they began
    start = norm_weights(train("start", 1, warmup=1) / "final" / "model.safetensors")
    start_error = worst_relative_error(start, w_star)
    g = norm_weights(world.paper / "model.safetensors")  # paper OPM: w = g
    assert min(((start[s] - g[s]).abs().max()).item() for s in g) > 0.1, "init was not random"

    converged = train("converged", NORM_ONLY_STEPS)
    error = worst_relative_error(norm_weights(converged / "final" / "model.safetensors"), w_star)
    short = train("short", NORM_ONLY_FEW_STEPS)
    short_error = worst_relative_error(norm_weights(short / "final" / "model.safetensors"), w_star)
    # the trainer's loss at the end is OPM's minimum: the report's per-site loss at w*, summed,
    # over the tokens (the trainer's loss is a mean over target tokens)
    final_loss = [r for r in read_metrics(converged) if r["type"] == "train"][-1]["loss"]
    minimum = sum(s["loss"]["calibrated"] for s in rep["sites"]) / rep["tokens"]
    print(f"[norm-only] max relative error to w*: start {start_error:.3g}, "
          f"{NORM_ONLY_FEW_STEPS} steps {short_error:.3g}, {NORM_ONLY_STEPS} steps {error:.3g} "
          f"(tolerance {NORM_ONLY_TOL:g}); final loss {final_loss:.10g}, OPM minimum {minimum:.10g}")
    assert start_error > 0.2, "the random start is already near w*: the test would prove nothing"
    assert error < NORM_ONLY_TOL
    assert short_error > NORM_ONLY_TOL, "negative control: 20 steps should not reach w*"
    assert math.isclose(final_loss, minimum, rel_tol=1e-5), (final_loss, minimum)


# ---------------------------------------------------------------------------------------------
# 3. the objectives learn; the final model is a Llama checkpoint HF loads
# ---------------------------------------------------------------------------------------------

OBJECTIVES = {  # objective -> job changes
    "xkd-logit": {},
    "xkd-logit-mse": {},
    "xkd-hidden": {"centre_teacher": False},  # the paper student keeps the teacher's stream mean
    "ce": {"teacher": ""},
}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_objective_learns_and_final_model_loads_in_hf(objective, world, kept_bin, tmp_path):
    output = tmp_path / "run"
    job = merged(base_job(world, output), {"objective": objective, "steps": 24,
                                           "optimizer": {"lr": 3e-3}}) | OBJECTIVES[objective]
    if not job["teacher"]:
        del job["teacher"]
    proc = run_kept(kept_bin, "train", write_job(tmp_path / "job.json", job))
    losses = [float(r["loss_exact"]) for r in read_metrics(output) if r["type"] == "train"]
    assert len(losses) == 24 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"[learn] {objective}: loss {first:.5g} -> {last:.5g} ({last / first:.3f}x)")
    assert last < 0.9 * first, f"{objective}: the loss did not decrease: {losses}"

    evals = eval_trace(output)
    assert len(evals) == 1 and evals[0]["step"] == 24 and evals[0]["tokens"] > 0, evals
    want = {"perplexity"} | ({"kl", "top1_agreement", "teacher_perplexity"}
                             if objective != "ce" else set())
    assert want <= set(evals[0]), evals[0]
    assert "held-out: perplexity" in proc.stdout

    final = output / "final"
    assert (final / "tokenizer.model").read_bytes() == world.tokenizer.read_bytes()
    model = load_llama(final)
    assert model.config.rms_norm_eps == EPS and model.config.vocab_size == VOCAB
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(0, VOCAB, (2, 19), generator=gen)
    rel = relative_error(kept_logits(kept_bin, final, ids, tmp_path / "fwd"), hf_logits(model, ids))
    assert rel <= LOGIT_REL_TOL, f"{objective}: kept forward vs HF logits rel {rel:.3e}"


# ---------------------------------------------------------------------------------------------
# 4. an exact conversion starts at zero loss
# ---------------------------------------------------------------------------------------------


def first_loss(world, kept, tmp_path: Path, name: str, **changes) -> float:
    output = tmp_path / name
    job = merged(base_job(world, output), {"steps": 1, "data": {"held_out_fraction": 0.0}} | changes)
    run_kept(kept, "train", write_job(tmp_path / f"{name}.json", job))
    return float(train_trace(output)[0][1])


def test_exact_student_starts_at_zero_kl(world, kept_bin, tmp_path):
    exact = first_loss(world, kept_bin, tmp_path, "exact", student=str(world.exact0),
                       teacher=str(world.teacher0))
    paper = first_loss(world, kept_bin, tmp_path, "paper", student=str(world.paper))
    print(f"[zero] xkd-logit at step 1: exact (b_final = 0) {exact:.3g}, paper {paper:.3g}")
    assert abs(exact) < 1e-6
    assert paper > 1e-3, "the paper mapping should be visibly off: the check has no teeth"


def test_exact_student_matches_the_centred_teacher_states(world, kept_bin, tmp_path):
    """Exact conversion centres the residual stream: xkd-hidden against the centred teacher is
    ~0 (rounding), against the raw teacher it is the stream mean the conversion removed."""
    centred = first_loss(world, kept_bin, tmp_path, "centred", objective="xkd-hidden",
                         student=str(world.exact), centre_teacher=True)
    raw = first_loss(world, kept_bin, tmp_path, "raw", objective="xkd-hidden",
                     student=str(world.exact), centre_teacher=False)
    print(f"[zero] xkd-hidden at step 1, exact student: centred teacher {centred:.3g}, "
          f"raw teacher {raw:.3g}")
    assert raw > 1.0
    assert centred < 1e-8 * raw


# ---------------------------------------------------------------------------------------------
# 5. bad input
# ---------------------------------------------------------------------------------------------


def assert_no_run(output: Path) -> None:
    """A failed start leaves nothing behind: not even the output directory."""
    assert not output.exists(), f"{output} was made by a run that failed to start: " \
                                f"{sorted(p.name for p in output.iterdir())}"


def bad_case(name: str, world: World, kept: Path, tmp_path: Path) -> tuple[dict, list]:
    """Job changes and the words the error must contain, for one kind of bad input."""
    if name == "empty-corpus":
        corpus = tmp_path / "empty.txt"
        corpus.write_text("\n \n\t\n")
        return {"data": {"train": str(corpus)}}, [corpus, "empty"]
    if name == "non-utf8-corpus":
        corpus = tmp_path / "latin1.txt"
        corpus.write_bytes(b"A fine first document.\n\nCaf\xe9 au lait.\n")
        return {"data": {"train": str(corpus)}}, [corpus, "UTF-8", "byte offset 27", "line 3"]
    if name == "jsonl-without-text":
        corpus = tmp_path / "corpus.jsonl"
        corpus.write_text('{"text": "one document"}\n{"txt": "a typo in the field"}\n')
        return {"data": {"train": str(corpus)}}, [corpus, "line 2", '"text"']
    if name == "tokenizer-larger-than-model":
        run_kept(kept, "tokenizer", "--input", world.corpus, "--vocab-size", VOCAB + 200,
                 "--output", tmp_path / "big-tok")
        tok = tmp_path / "big-tok" / "tokenizer.model"
        return {"tokenizer": str(tok)}, [tok, str(VOCAB + 200), str(VOCAB),
                                         world.paper / "config.json"]
    if name == "vocab-mismatch-xkd-logit":
        student = kept_init_llama(kept, tmp_path / "student512", vocab=512, hidden=HIDDEN)
        return {"student": str(student)}, ["xkd-logit", "vocabulary", "512", str(VOCAB)]
    if name == "hidden-mismatch-xkd-hidden":
        student = kept_init_llama(kept, tmp_path / "student48", vocab=VOCAB, hidden=48)
        return ({"student": str(student), "objective": "xkd-hidden"},
                ["xkd-hidden", "hidden size", "48", str(HIDDEN)])
    if name == "unknown-field":
        return {"optimizer": {"weight_decy": 0.1}}, ['"optimizer"', 'unknown field "weight_decy"']
    raise AssertionError(name)


BAD_CASES = ["empty-corpus", "non-utf8-corpus", "jsonl-without-text",
             "tokenizer-larger-than-model", "vocab-mismatch-xkd-logit",
             "hidden-mismatch-xkd-hidden", "unknown-field"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_fails_cleanly(case, world, kept_bin, tmp_path):
    changes, needles = bad_case(case, world, kept_bin, tmp_path)
    output = tmp_path / "run"
    job = write_job(tmp_path / "job.json", merged(base_job(world, output), changes))
    inputs = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    proc = expect_failure(kept_bin, "train", job, needles=needles)
    # errors about the job itself name the job file
    if case in ("vocab-mismatch-xkd-logit", "hidden-mismatch-xkd-hidden", "unknown-field"):
        assert str(job) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "terminate called" not in proc.stderr
    assert_no_run(output)
    for path, content in inputs.items():
        assert path.read_bytes() == content, f"{path} changed"


@pytest.mark.parametrize("case", ["empty-corpus", "unknown-field", "vocab-mismatch-xkd-logit"])
def test_bad_input_with_force_keeps_the_existing_run(case, world, kept_bin, reference_run,
                                                     tmp_path):
    """--force replaces a run only once the new one can start: a job that fails on its input
    leaves the old run as it was."""
    output = tmp_path / "existing"
    shutil.copytree(reference_run, output)
    before = snapshot(output)
    changes, needles = bad_case(case, world, kept_bin, tmp_path)
    job = write_job(tmp_path / "job.json", merged(base_job(world, output), changes))
    expect_failure(kept_bin, "train", job, "--force", needles=needles)
    assert snapshot(output) == before, "a failed --force start destroyed the run it would replace"


def test_existing_run_is_refused_without_resume_or_force(world, kept_bin, reference_run, tmp_path):
    output = tmp_path / "existing"
    shutil.copytree(reference_run, output)
    before = snapshot(output)
    job = write_job(tmp_path / "job.json", merged(base_job(world, output), RESUME_CHANGES))
    expect_failure(kept_bin, "train", job, needles=[output, "--resume", "--force"])
    assert snapshot(output) == before
    # resuming under a configuration that changes the run itself is refused, untouched
    expect_failure(kept_bin, "train", job, "--resume", "--set", "temperature=2.0",
                   needles=["step-000015", "different configuration"])
    assert snapshot(output) == before
    # --force does start over
    run_kept(kept_bin, "train", job, "--force", "--steps", 2)
    assert [s for s, _ in train_trace(output)] == [1, 2]
    assert not complete_checkpoints(output)


def test_nan_loss_stops_naming_the_last_good_checkpoint(world, kept_bin, reference_run):
    job, output = resume_job(world, "nan")
    log = world.root / "nan.log"
    # a run killed once its step-6 checkpoint exists
    run = Watched(kept_bin, job, log=log)
    assert run.kill_when(lambda: 6 in complete_checkpoints(output)), run.output_text()
    good = max(complete_checkpoints(output))
    good_path = complete_checkpoints(output)[good]
    good_bytes = snapshot(good_path)
    # resumed with an absurd learning rate: the first update blows the weights up, the next
    # loss is not finite
    proc = expect_failure(kept_bin, "train", job, "--resume", "--set", "optimizer.lr=1e30",
                          needles=[good_path, "--resume", "lower learning rate"])
    m = re.search(r"step (\d+): the (loss|gradient norm) is (\S+)", proc.stderr)
    assert m, proc.stderr
    step, value = int(m[1]), m[3]
    print(f"[nan] lr 1e30 from step {good}: stopped at step {step}, {m[2]} {value}")
    assert step == good + 2 and not math.isfinite(float(value)), proc.stderr
    assert max(complete_checkpoints(output)) == good, "a checkpoint was written after the blow-up"
    assert snapshot(good_path) == good_bytes
    assert_loadable_checkpoint(good_path, good)
    assert max(logged_train_steps(output)) == step - 1  # the bad step was not logged
    # resumed from it with a sane learning rate (the job's own, given with --set), it finishes
    # exactly like the uninterrupted run: the failed attempt left nothing behind
    proc = run_kept(kept_bin, "train", job, "--resume", "--set",
                    f"optimizer.lr={RESUME_CHANGES['optimizer']['lr']}")
    assert resumed_from(proc.stderr) == good
    assert train_trace(output) == train_trace(reference_run)
    assert (output / "final" / "model.safetensors").read_bytes() == \
        (reference_run / "final" / "model.safetensors").read_bytes()


def test_inf_teacher_stops_at_step_one_without_checkpoint(world, kept_bin, tmp_path):
    teacher = tmp_path / "inf-teacher"
    shutil.copytree(world.teacher, teacher)
    tensors = load_file(str(teacher / "model.safetensors"))
    tensors["lm_head.weight"][3, :] = float("inf")
    save_file(tensors, str(teacher / "model.safetensors"), metadata={"format": "pt"})
    output = tmp_path / "run"
    job = write_job(tmp_path / "job.json", merged(base_job(world, output), {
        "teacher": str(teacher), "checkpoint": {"every": 1}}))
    proc = expect_failure(kept_bin, "train", job,
                          needles=["step 1:", "learning rate is not the cause", "teacher"])
    assert re.search(r"the (loss|gradient norm) is -?(nan|inf)", proc.stderr), proc.stderr
    assert not complete_checkpoints(output) and not (output / "final").exists()


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(world, kept_bin,
                                                                     reference_run):
    """RLIMIT_FSIZE stands in for a full disk: once the first checkpoint exists, the run's file
    size limit drops below the size of a checkpoint's model.safetensors, so the next checkpoint
    write fails with EFBIG (SIGXFSZ is ignored, as a shell's `trap '' XFSZ` would)."""
    job, output = resume_job(world, "full-disk")
    limit = 64 * 1024  # metrics.jsonl and job.json stay far below; the checkpoint files do not
    assert (reference_run / "checkpoints" / "step-000015" / "model.safetensors").stat().st_size > limit

    run = Watched(kept_bin, job, log=world.root / "full-disk.log", ignore_sigxfsz=True)
    while not complete_checkpoints(output) and run.proc.poll() is None and \
            time.monotonic() < run.deadline:
        time.sleep(POLL_S)
    try:
        os.kill(run.proc.pid, signal.SIGSTOP)
        resource.prlimit(run.proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
        good = max(complete_checkpoints(output))
    finally:
        os.kill(run.proc.pid, signal.SIGCONT)
    status = run.wait()
    text = run.output_text()
    assert status > 0, f"status {status}:\n{text}"
    failed = good + RESUME_CHANGES["checkpoint"]["every"]
    print(f"[full disk] checkpoint {good} written, {failed} failed: {text.strip().splitlines()[-1]}")
    good_path = complete_checkpoints(output)[good]
    for needle in (f"step {failed}: saving the checkpoint failed", f"step-{failed:06d}",
                   "model.safetensors", "File too large", f"checkpoint is {good_path}", "--resume"):
        assert needle in text, f"the error does not say {needle!r}:\n{text}"
    assert max(complete_checkpoints(output)) == good
    assert not checkpoint_debris(output), "the failed checkpoint left its temporary directory"
    assert_loadable_checkpoint(complete_checkpoints(output)[good], good)
    assert not (output / "final").exists()
    proc = run_kept(kept_bin, "train", job, "--resume")
    assert resumed_from(proc.stderr) == good
    assert train_trace(output) == train_trace(reference_run)
    assert (output / "final" / "model.safetensors").read_bytes() == \
        (reference_run / "final" / "model.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------------
# 6. kept eval against HF
# ---------------------------------------------------------------------------------------------


def evaluation_windows(path: Path, tokenizer: Path, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kept's evaluation packing (kept/train/data.hpp evaluation_batches): every document
    followed by EOS, in corpus order; window i holds inputs stream[i L, i L + L) and targets
    stream[i L + 1, i L + L + 1); the last window is padded with EOS inputs and -1 targets."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    stream = []
    for document in split_documents(path.read_text(encoding="utf-8")):
        stream += sp.encode(document) + [sp.eos_id()]
    count = math.ceil((len(stream) - 1) / seq)
    inputs = torch.full((count, seq), sp.eos_id(), dtype=torch.int64)
    targets = torch.full((count, seq), -1, dtype=torch.int64)
    for i in range(count):
        chunk = stream[i * seq:i * seq + seq + 1]
        inputs[i, :min(seq, len(chunk))] = torch.tensor(chunk[:seq])
        targets[i, :len(chunk) - 1] = torch.tensor(chunk[1:])
    return inputs, targets


def test_eval_matches_hf(world, kept_bin, tmp_path):
    data = write_corpus(tmp_path / "held-out.txt", generated_documents(9, 12, WORDS))
    seq = 24
    out = tmp_path / "eval.json"
    proc = run_kept(kept_bin, "eval", world.paper, "--teacher", world.teacher, "--data", data,
                    "--seq-len", seq, "--batch-size", 3, "--json", out)
    got = json.loads(out.read_text())
    printed = proc.stdout
    for pattern in (r"perplexity\s+[0-9.]+", r"teacher\s+[0-9.]+", r"KL\(teacher\|\|model\) [0-9.]+",
                    r"top-1 agreement\s+[0-9.]+%", r"perplexity by context length"):
        assert re.search(pattern, printed), f"kept eval did not print {pattern!r}:\n{printed}"
    buckets = re.findall(r"^\s+(\d+)-(\d+)\s+([0-9.]+)\s+teacher\s+([0-9.]+)$", printed, re.M)
    assert len(buckets) == len(got["context_bucket_start"]) >= 4, printed

    inputs, targets = evaluation_windows(data, world.paper / "tokenizer.model", seq)
    student = hf_logits(load_llama(world.paper), inputs)
    teacher = hf_logits(world.teacher_model, inputs)
    mask = targets >= 0
    y = targets.clamp(min=0)
    log_q, log_p = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    ce_s = -log_q.gather(-1, y[..., None])[..., 0]
    ce_t = -log_p.gather(-1, y[..., None])[..., 0]
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    n = mask.sum().item()
    want = {
        "tokens": n,
        "perplexity": math.exp(ce_s[mask].sum().item() / n),
        "teacher_perplexity": math.exp(ce_t[mask].sum().item() / n),
        "kl": kl[mask].sum().item() / n,
    }
    assert got["tokens"] == want["tokens"]
    for key in ("perplexity", "teacher_perplexity", "kl"):
        assert math.isclose(got[key], want[key], rel_tol=EVAL_REL_TOL), (key, got[key], want[key])
    # top-1 agreement: an argmax may flip between implementations only where the two largest
    # logits are within rounding of each other; count those and allow that many flips
    agree = (student.argmax(-1) == teacher.argmax(-1))[mask]
    near_tie = torch.zeros_like(mask)
    for logits in (student, teacher):
        top2 = logits.topk(2, dim=-1).values
        near_tie |= (top2[..., 0] - top2[..., 1]) < 1e-4 * logits.abs().amax()
    slack = near_tie[mask].sum().item() / n
    assert abs(got["top1_agreement"] - agree.double().mean().item()) <= slack + 1e-12, \
        (got["top1_agreement"], agree.double().mean().item(), slack)
    assert 0 < got["top1_agreement"] < 1 and got["kl"] > 1e-3  # a non-trivial comparison
    # perplexity by context length: positions [0, 1), [1, 2), [2, 4), [4, 8), ...
    starts, s = [], 0
    while s < seq:
        starts.append(s)
        s = s * 2 if s else 1
    assert got["context_bucket_start"] == starts
    for k, start in enumerate(starts):
        end = min(seq, 2 * start if start else 1)
        m = mask[:, start:end]
        for key, ce in (("perplexity_by_context", ce_s), ("teacher_perplexity_by_context", ce_t)):
            want_ppl = math.exp(ce[:, start:end][m].sum().item() / m.sum().item())
            assert math.isclose(got[key][k], want_ppl, rel_tol=EVAL_REL_TOL), (key, start, got[key][k],
                                                                              want_ppl)
        # and the printed table says the same, to its 4 decimals
        assert int(buckets[k][0]) == start and int(buckets[k][1]) == end - 1
        assert abs(float(buckets[k][2]) - got["perplexity_by_context"][k]) <= 0.6e-4
        assert abs(float(buckets[k][3]) - got["teacher_perplexity_by_context"][k]) <= 0.6e-4
    printed_kl = float(re.search(r"KL\(teacher\|\|model\) ([0-9.]+)", printed)[1])
    assert abs(printed_kl - got["kl"]) <= 0.6e-5
    printed_top1 = float(re.search(r"top-1 agreement\s+([0-9.]+)%", printed)[1])
    assert abs(printed_top1 - 100 * got["top1_agreement"]) <= 0.006
    print(f"[eval] {n} tokens: perplexity {got['perplexity']:.4f} (HF {want['perplexity']:.4f}), "
          f"KL {got['kl']:.5f} (HF {want['kl']:.5f}), top-1 {got['top1_agreement']:.4f} "
          f"(HF {agree.double().mean().item():.4f})")


# ---------------------------------------------------------------------------------------------
# 7. --device cuda: the CUDA backend (emulated on the CPU in a KEPT_CUDA_EMULATION build) trains
#    the same job, says which device it is on, and resumes bit-exactly after a SIGKILL
# ---------------------------------------------------------------------------------------------

CUDA_CHANGES = {**RESUME_CHANGES, "device": "cuda", "steps": 8,
                "eval": {"every": 4, "max_batches": 1}, "checkpoint": {"every": 3, "keep": 2}}


# The optimizer's compact states (kept/train/adamw.hpp): bf16 weights rounded stochastically
# without fp32 masters, 8-bit blockwise moments (min_8bit_size 256 so that the tiny model's
# matrices are quantised too, not only its embedding).
COMPACT_OPTIMIZER = {"memory": {"master_weights": "none", "optimizer_states": "int8"},
                     "optimizer": {**RESUME_CHANGES["optimizer"],
                                   "min_8bit_size": 256}}


def cuda_job(world: World, name: str, changes: dict) -> tuple[Path, Path]:
    output = world.root / name
    job = write_job(world.root / f"{name}.json",
                    merged(merged(base_job(world, output), CUDA_CHANGES), changes))
    return job, output


@pytest.mark.parametrize("optimizer", ["fp32-masters", "compact"])
def test_device_cuda_trains_and_resumes_bit_exactly(world, kept_bin, reference_run, optimizer):
    changes = COMPACT_OPTIMIZER if optimizer == "compact" else {}
    job, output = cuda_job(world, f"cuda-{optimizer}-reference", changes)
    proc = run_kept(kept_bin, "train", job, check=False, threads=KEPT_THREADS)
    if proc.returncode != 0 and "built without the CUDA backend" in proc.stderr:
        pytest.skip("this kept has no CUDA backend (no nvcc, KEPT_CUDA_EMULATION off)")
    if proc.returncode != 0 and "no usable CUDA device" in proc.stderr:
        pytest.skip("a GPU build of kept on a machine without a GPU: " + proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("device cuda: "), first
    described = ("bf16 weights rounded stochastically (no masters), 8-bit moments"
                 if optimizer == "compact" else "fp32 master weights, 32-bit moments")
    assert f"optimizer: AdamW, {described}" in proc.stderr, proc.stderr
    reference = train_trace(output)
    assert [s for s, _ in reference] == list(range(1, 9))
    losses = [float(x) for _, x in reference]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    # The same job on the CPU (fp32) starts from the same weights and batches: the bf16 run's
    # first loss is within the bf16 bound of tests/emulation/test_training_comparison.cpp.
    cpu_first = float(train_trace(reference_run)[0][1])
    assert abs(losses[0] - cpu_first) <= 32 * 2.0 ** -8 * abs(cpu_first), (losses[0], cpu_first)
    final = snapshot(output / "final")

    # Killed between checkpoints (after step 4; the newest checkpoint is step 3), then resumed.
    killed_job, killed = cuda_job(world, f"cuda-{optimizer}-killed", changes)
    run = Watched(kept_bin, killed_job, log=world.root / f"cuda-{optimizer}-killed-0.log")
    assert run.kill_when(lambda: max(logged_train_steps(killed), default=0) >= 4), \
        run.output_text()
    assert complete_checkpoints(killed), run.output_text()
    run = Watched(kept_bin, killed_job, "--resume",
                  log=world.root / f"cuda-{optimizer}-killed-1.log")
    assert run.wait() == 0, run.output_text()
    assert resumed_from(run.output_text()) == max(s for s in complete_checkpoints(killed) if s <= 4)
    assert train_trace(killed) == reference
    assert snapshot(killed / "final") == final


def test_device_cuda_forward_and_eval_agree_with_cpu(world, kept_bin, tmp_path):
    """kept forward / eval --device cuda against HF (float64) and the CPU run: bf16 weights and
    activations cost a few bf16 roundings (u = 2^-8) per layer op, so with 2 layers the logits
    are within 8 u of the float64 ones (relative to the largest logit) and the perplexity within
    8 u of the fp32 CPU figure."""
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(5))
    ids_path, out_path = write_ids(tmp_path / "ids.safetensors", ids), tmp_path / "out.safetensors"
    proc = run_kept(kept_bin, "forward", world.paper, "--input", ids_path, "--out", out_path,
                    "--device", "cuda", check=False, threads=KEPT_THREADS)
    if proc.returncode != 0 and ("built without the CUDA backend" in proc.stderr
                                 or "no usable CUDA device" in proc.stderr):
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("device cuda: "), proc.stderr
    got = load_file(str(out_path))["logits"].double()
    want = hf_logits(load_llama(world.paper), ids)
    error = relative_error(got, want)
    print(f"[cuda] forward: max |logit - HF float64| / max |logit| = {error:.2e}")
    assert error <= 8 * 2.0 ** -8, error

    data = write_corpus(tmp_path / "held-out.txt", generated_documents(9, 12, WORDS))
    figures = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"eval-{device}.json"
        run_kept(kept_bin, "eval", world.paper, "--teacher", world.teacher, "--data", data,
                 "--seq-len", 24, "--batch-size", 3, "--json", out, "--device", device,
                 threads=KEPT_THREADS)
        figures[device] = json.loads(out.read_text())
    print(f"[cuda] eval: perplexity cpu {figures['cpu']['perplexity']:.5f}, "
          f"cuda {figures['cuda']['perplexity']:.5f}")
    assert figures["cuda"]["tokens"] == figures["cpu"]["tokens"]
    for key in ("perplexity", "teacher_perplexity"):
        assert math.isclose(figures["cuda"][key], figures["cpu"][key], rel_tol=8 * 2.0 ** -8), key
