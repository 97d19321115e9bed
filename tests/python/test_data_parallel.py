"""Data parallel over MPI: `mpirun -np N kept train JOB` (reference/trainer.hpp,
TrainOptions::communicator; the communicator in include/kept/dist/mpi_communicator.hpp).

Each rank runs whole micro-batches of every step (micro-batch m on rank m mod N), the gradients
are summed over the ranks in rank order, and rank 0 alone evaluates and writes. The global batch
is batch_size x grad_accum sequences whatever the rank count, so N ranks train the same model as
one process; the sum's order differs (one process adds micro-batch after micro-batch, N ranks add
their partial sums), so the losses agree to rounding, not to the bit:

1. `-np 2` and `-np 3` (2, 1 and 1 micro-batches: uneven) reproduce one process's losses within
   LOSS_REL_TOL and its final weights within WEIGHT_REL_TOL; with the gradients summed inside
   backward layer by layer (memory.gradients "none") `-np 2` gives the buffered `-np 2` run bit
   for bit (clipping off); rank 0 alone writes (one metrics record per step).
2. A checkpoint written by 2 ranks resumes on 3 ranks and on 1 process.
3. ZeRO (include/kept/train/zero.hpp; job field "zero_stage"): stages 1 and 2 keep only the
   rank's shard of the optimizer state, reduce-scatter the gradients and all-gather the weights;
   stage 3 keeps only the rank's shard of the layers' weights too and gathers a layer whenever it
   runs. With clipping off stages 1, 2 and 3 give stage 0's losses and final weights bit for bit
   on 2 and 3 ranks (8-bit states included), their checkpoints hold the same weights and the
   same whole optimizer state as stage 0's, and stage 3's measured peak memory is below stage
   2's. A 3-rank stage-2 checkpoint resumes bit for bit under stage 0 on 3 ranks, and within
   the tolerances above on 2 ranks (stages 1 and 3) and on one process. Stages 2 and 3 with a
   gradient buffer are refused, and so is stage 3 when the ranks would run unequal numbers of
   micro-batches.
4. On the emulated CUDA backend MPI stands in for NCCL: 2 ranks at stages 0, 2 and 3 (bf16
   weights without masters, 8-bit states) give one process's run bit for bit (one micro-batch a
   rank).
5. Bad input fails on every rank with a clear error and no hang: ranks given different jobs
   (MPMD launch), fewer micro-batches than ranks; a rank SIGKILLed mid-run ends the
   job within DEAD_RANK_S, leaving only complete checkpoints.

The tiny models, tokenizer and corpus come from test_trainer.py's `world` fixture.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_memory_plan import PEAK_TOLERANCE, small_job
from test_trainer import (  # noqa: F401  (world is a fixture)
    base_job,
    complete_checkpoints,
    merged,
    read_metrics,
    run_kept,
    train_trace,
    world,
    write_job,
)

MPIRUN = shutil.which("mpirun")
pytestmark = pytest.mark.skipif(MPIRUN is None,
                                reason="no mpirun (scripts/install_deps.sh installs Open MPI)")

LOSS_REL_TOL = 1e-6    # |loss_N / loss_1 - 1| per step, 4 steps (measured: 1e-8)
WEIGHT_REL_TOL = 1e-5  # max |w_N - w_1| / max |w_1| per tensor (measured: 2.2e-7)
DEAD_RANK_S = 60       # a killed rank must end the job within this
COMMON = {"grad_accum": 4, "steps": 4, "eval": {"every": 2, "max_batches": 2}}


def mpi_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               # containers run as root; mpirun refuses it without these
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def mpirun_command(kept_bin: Path, ranks: int, *args) -> list[str]:
    return [MPIRUN, "-np", str(ranks), "--oversubscribe", str(kept_bin), *map(str, args)]


def mpirun(kept_bin: Path, ranks: int, *args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(mpirun_command(kept_bin, ranks, *args), capture_output=True, text=True,
                          errors="replace", timeout=300, env=mpi_env(), check=False)
    if proc.returncode != 0 and "built without MPI" in proc.stderr:
        pytest.skip("this kept was built without MPI")
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def final_weights(output: Path) -> dict:
    return load_file(str(output / "final" / "model.safetensors"))


def assert_close_runs(got: Path, want: Path, label: str) -> None:
    got_trace, want_trace = train_trace(got), train_trace(want)
    assert [s for s, _ in got_trace] == [s for s, _ in want_trace], label
    for (step, a), (_, b) in zip(got_trace, want_trace):
        assert abs(float(a) / float(b) - 1) <= LOSS_REL_TOL, (label, step, a, b)
    w_got, w_want = final_weights(got), final_weights(want)
    assert w_got.keys() == w_want.keys()
    for name, value in w_want.items():
        scale = float(value.double().abs().max()) or 1.0
        error = float((w_got[name].double() - value.double()).abs().max())
        assert error <= WEIGHT_REL_TOL * scale, (label, name, error / scale)


def test_ranks_reproduce_one_process(world, kept_bin, tmp_path):
    runs = {}
    for ranks in (1, 2, 3):
        output = tmp_path / f"np{ranks}"
        job = write_job(tmp_path / f"np{ranks}.json", merged(base_job(world, output), COMMON))
        if ranks == 1:
            run_kept(kept_bin, "train", job)
        else:
            proc = mpirun(kept_bin, ranks, "train", job)
            assert f"data parallel: {ranks} ranks" in proc.stderr
        runs[ranks] = output
        # Rank 0 alone writes: one record per step, the evaluations once.
        records = read_metrics(output)
        assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4]
        assert [r["step"] for r in records if r["type"] == "eval"] == [2, 4]
    for ranks in (2, 3):
        assert_close_runs(runs[ranks], runs[1], f"-np {ranks}")

    # The layer-by-layer sums of memory.gradients "none" against the one buffer sum.
    exact = {}
    for name, memory in (("buffer", {}), ("none", {"gradients": "none"})):
        output = tmp_path / f"np2-{name}"
        job = merged(merged(base_job(world, output), COMMON),
                     {"clip_grad_norm": 0, "memory": memory})
        mpirun(kept_bin, 2, "train", write_job(tmp_path / f"np2-{name}.json", job))
        exact[name] = (train_trace(output), (output / "final" / "model.safetensors").read_bytes())
    assert exact["none"] == exact["buffer"]


def test_a_two_rank_checkpoint_resumes_on_three_ranks_and_on_one(world, kept_bin, tmp_path):
    changes = merge_all(COMMON, {"checkpoint": {"every": 2, "keep": 2}})
    output = tmp_path / "np2"
    job = write_job(tmp_path / "np2.json", merged(base_job(world, output), changes))
    mpirun(kept_bin, 2, "train", job)
    assert sorted(complete_checkpoints(output)) == [2, 4]
    for name, ranks in (("np3", 3), ("np1", 1)):
        # The 2-rank run as it stood after step 2: its step-4 checkpoint and final model gone.
        resumed = tmp_path / name
        shutil.copytree(output, resumed)
        shutil.rmtree(complete_checkpoints(resumed)[4])
        shutil.rmtree(resumed / "final")
        resumed_job = write_job(tmp_path / f"{name}.json",
                                merged(base_job(world, resumed), changes))
        if ranks == 1:
            proc = run_kept(kept_bin, "train", resumed_job, "--resume")
        else:
            proc = mpirun(kept_bin, ranks, "train", resumed_job, "--resume")
        assert "(step 2)" in proc.stderr, proc.stderr
        assert_close_runs(resumed, output, f"2 ranks resumed on {ranks}")


def optimizer_state(checkpoint: Path) -> dict:
    return load_file(str(checkpoint / "optimizer.safetensors"))


def checkpoint_weights(checkpoint: Path) -> dict:
    weights = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        if path.name != "optimizer.safetensors":
            weights.update(load_file(str(path)))
    assert weights, f"no weights in {checkpoint}"
    return weights


def assert_same_tensors(got: dict, want: dict, label: str) -> None:
    assert got.keys() == want.keys(), (label, sorted(set(got) ^ set(want)))
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, (label, name)
        assert got[name].view(-1).view(dtype=torch.uint8).equal(
            value.view(-1).view(dtype=torch.uint8)), (label, name)


@pytest.mark.parametrize("ranks,states", [(2, "fp32"), (3, "fp32"), (3, "int8")])
def test_zero_stages_agree_bit_for_bit(world, kept_bin, tmp_path, ranks, states):
    # Clipping off: the clip coefficient is the one thing the stages may round differently
    # (the norm is summed from the shards). min_8bit_size 256 puts the tiny model's matrices
    # on 8-bit moments, so shards cut through quantisation blocks' parameters.
    # Stage 3 needs as many micro-batches on every rank: one each on 3 ranks.
    changes = merge_all(COMMON, {"clip_grad_norm": 0, "checkpoint": {"every": 2, "keep": 2},
                                 "optimizer": {"min_8bit_size": 256},
                                 "memory": {"optimizer_states": states},
                                 "grad_accum": 4 if ranks == 2 else 3})
    runs = {}
    for stage, gradients in ((0, "buffer"), (1, "buffer"), (2, "none"), (3, "none")):
        output = tmp_path / f"stage{stage}"
        job = merge_all(base_job(world, output), changes,
                        {"zero_stage": stage, "memory": {"gradients": gradients}})
        proc = mpirun(kept_bin, ranks, "train", write_job(tmp_path / f"stage{stage}.json", job))
        if stage:
            assert f"ZeRO stage {stage}" in proc.stderr, proc.stderr
        runs[stage] = output
    for stage in (1, 2, 3):
        label = f"stage {stage} on {ranks} ranks, {states} states"
        assert train_trace(runs[stage]) == train_trace(runs[0]), label
        assert ((runs[stage] / "final" / "model.safetensors").read_bytes()
                == (runs[0] / "final" / "model.safetensors").read_bytes()), label
        # The gathered checkpoint state is the replicated one, tensor for tensor, and so are the
        # checkpoint's weights (at stage 3 gathered from the shards for the writer).
        for step in (2, 4):
            got, want = complete_checkpoints(runs[stage])[step], complete_checkpoints(runs[0])[step]
            assert_same_tensors(optimizer_state(got), optimizer_state(want),
                                f"{label}, checkpoint {step}")
            assert_same_tensors(checkpoint_weights(got), checkpoint_weights(want),
                                f"{label}, checkpoint {step} weights")
        norms = [r["grad_norm"] for r in read_metrics(runs[stage]) if r["type"] == "train"]
        want = [r["grad_norm"] for r in read_metrics(runs[0]) if r["type"] == "train"]
        assert norms == pytest.approx(want, rel=1e-12), label


def test_zero3_memory_is_what_kept_plan_says(kept_bin, tmp_path):
    # The 14B job scaled down to 8 layers, `--synthetic` on 2 ranks (no checkpoint, whose
    # writer holds the layers whole while it writes): stage 3 keeps half of the layers' weights
    # and two gathered layers instead of all eight, and each stage's measured peak is the plan's.
    peaks = {}
    for stage in (2, 3):
        job = small_job(tmp_path / f"stage{stage}", grad_accum=2, zero_stage=stage,
                        memory={"gradients": "none"}, layers=8)
        proc = mpirun(kept_bin, 2, "train", job, "--synthetic", "--steps", 2)
        measured, planned = (float(x) for x in re.search(
            r"memory: +peak ([\d.]+) MiB measured, ([\d.]+) MiB planned", proc.stdout).groups())
        assert f"ZeRO-{stage}" in proc.stdout, proc.stdout
        assert abs(measured / planned - 1) <= PEAK_TOLERANCE, (stage, proc.stdout)
        peaks[stage] = measured
    assert peaks[3] < peaks[2], peaks


def test_a_zero_checkpoint_resumes_on_other_ranks_and_stages(world, kept_bin, tmp_path):
    # memory.gradients is part of what a checkpoint continues (it decides how clipping works),
    # the stage and the rank count are not.
    changes = merge_all(COMMON, {"clip_grad_norm": 0, "checkpoint": {"every": 2, "keep": 2},
                                 "memory": {"gradients": "none"}})
    output = tmp_path / "np3-stage2"
    job = merge_all(base_job(world, output), changes, {"zero_stage": 2})
    mpirun(kept_bin, 3, "train", write_job(tmp_path / "np3-stage2.json", job))
    for name, ranks, stage in (("np3-stage0", 3, 0), ("np2-stage1", 2, 1), ("np2-stage3", 2, 3),
                               ("np1-stage1", 1, 1)):
        resumed = tmp_path / name
        shutil.copytree(output, resumed)
        shutil.rmtree(complete_checkpoints(resumed)[4])
        shutil.rmtree(resumed / "final")
        resumed_job = write_job(tmp_path / f"{name}.json",
                                merge_all(base_job(world, resumed), changes, {"zero_stage": stage}))
        if ranks == 1:
            proc = run_kept(kept_bin, "train", resumed_job, "--resume")
        else:
            proc = mpirun(kept_bin, ranks, "train", resumed_job, "--resume")
        assert "(step 2)" in proc.stderr, proc.stderr
        if ranks == 3:  # the same sums, the same bits
            assert train_trace(resumed) == train_trace(output)
            assert ((resumed / "final" / "model.safetensors").read_bytes()
                    == (output / "final" / "model.safetensors").read_bytes())
        else:
            assert_close_runs(resumed, output, f"3-rank stage-2 checkpoint on {name}")


def test_ranks_on_the_emulated_cuda_backend(world, kept_bin, tmp_path):
    # The emulated CUDA backend keeps "device" memory on the host, so MPI stands in for NCCL
    # and the GPU path runs data parallel: bf16 weights (all-gathered as 2-byte elements) without
    # masters, rounded stochastically by each owner, 8-bit states sharded, fp32 gradients.
    # Fewer steps than COMMON (the emulator is slow), and grad_accum 2 on 2 ranks.
    changes = merge_all(COMMON, {"device": "cuda", "clip_grad_norm": 0, "steps": 3,
                                 "grad_accum": 2, "eval": {"every": 0},
                                 "optimizer": {"min_8bit_size": 256},
                                 "memory": {"master_weights": "none", "optimizer_states": "int8"}})
    runs = {}
    # "np1-collectives": one process with --nccl, which on the emulator runs every collective
    # through the one-rank communicator (on a GPU through NCCL: scripts/device.sh).
    for name, ranks, stage, gradients in (("np1", 1, 0, "buffer"), ("np2-stage0", 2, 0, "buffer"),
                                          ("np2-stage2", 2, 2, "none"),
                                          ("np2-stage3", 2, 3, "none"),
                                          ("np1-collectives", 1, 2, "none")):
        output = tmp_path / name
        job = write_job(tmp_path / f"{name}.json",
                        merge_all(base_job(world, output), changes,
                                  {"zero_stage": stage, "memory": {"gradients": gradients}}))
        if ranks == 1:
            flags = ["--nccl"] if name == "np1-collectives" else []
            proc = run_kept(kept_bin, "train", job, *flags, check=False)
            if proc.returncode != 0 and ("built without the CUDA backend" in proc.stderr
                                         or "no usable CUDA device" in proc.stderr):
                pytest.skip("this kept has no emulated CUDA backend")
            assert proc.returncode == 0, proc.stderr
        else:
            mpirun(kept_bin, ranks, "train", job)
        runs[name] = output
    # One micro-batch a rank: the rank-ordered sum adds the micro-batches' gradients in the
    # order one process accumulates them, so the runs agree bit for bit with one process.
    for name in ("np2-stage0", "np2-stage2", "np2-stage3", "np1-collectives"):
        assert train_trace(runs[name]) == train_trace(runs["np1"]), name
        assert ((runs[name] / "final" / "model.safetensors").read_bytes()
                == (runs["np1"] / "final" / "model.safetensors").read_bytes()), name


@pytest.mark.parametrize("case,changes,needles", [
    ("stage3-unequal", {"zero_stage": 3, "grad_accum": 3, "memory": {"gradients": "none"}},
     ["zero_stage 3", "grad_accum 3 is not a multiple of the 2 ranks", "set grad_accum to 4"]),
    ("stage2-buffer", {"zero_stage": 2, "memory": {"gradients": "buffer"}},
     ["zero_stage 2", "memory.gradients \"none\"", "zero_stage 1"]),
    ("stage3-buffer", {"zero_stage": 3, "memory": {"gradients": "buffer"}},
     ["zero_stage 3", "memory.gradients \"none\"", "zero_stage 1"]),
    ("stage9", {"zero_stage": 9}, ["\"zero_stage\" must be 0, 1, 2 or 3, got 9"]),
])
def test_zero_stages_kept_train_cannot_run_are_refused(world, kept_bin, tmp_path, case, changes,
                                                      needles):
    output = tmp_path / case
    job = write_job(tmp_path / f"{case}.json", merge_all(base_job(world, output), COMMON, changes))
    proc = mpirun(kept_bin, 2, "train", job, check=False)
    assert proc.returncode != 0
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert not output.exists()


def merge_all(*changes: dict) -> dict:
    result: dict = {}
    for change in changes:
        result = merged(result, change)
    return result


def test_mismatched_jobs_fail_on_every_rank(world, kept_bin, tmp_path):
    jobs = []
    for lr in (3e-3, 1e-3):
        job = merge_all(base_job(world, tmp_path / "out"), COMMON, {"optimizer": {"lr": lr}})
        jobs.append(write_job(tmp_path / f"lr{lr}.json", job))
    # MPMD: rank 0 runs one job, rank 1 the other.
    command = [MPIRUN, "--oversubscribe", "-np", "1", str(kept_bin), "train", str(jobs[0]), ":",
               "-np", "1", str(kept_bin), "train", str(jobs[1])]
    proc = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=120,
                          env=mpi_env(), check=False)
    if "built without MPI" in proc.stderr:
        pytest.skip("this kept was built without MPI")
    assert proc.returncode != 0
    assert proc.stderr.count("ranks disagree on the job") == 2, proc.stderr  # on both ranks
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("case,changes,needles", [
    ("too-few-micro-batches", {"grad_accum": 2}, ["grad_accum 2", "3 ranks", "grad_accum >= 3"]),
])
def test_bad_rank_counts_and_devices_are_refused(world, kept_bin, tmp_path, case, changes,
                                                 needles):
    output = tmp_path / case
    job = write_job(tmp_path / f"{case}.json",
                    merge_all(base_job(world, output), COMMON, changes))
    proc = mpirun(kept_bin, 3, "train", job, check=False)
    assert proc.returncode != 0
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert not output.exists()


def rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in environ:
        if entry.startswith(b"OMPI_COMM_WORLD_RANK="):
            return int(entry.split(b"=", 1)[1])
    return None


def test_a_killed_rank_ends_the_job(world, kept_bin, tmp_path):
    output = tmp_path / "killed"
    job = write_job(tmp_path / "killed.json",
                    merge_all(base_job(world, output), COMMON,
                              {"steps": 400, "checkpoint": {"every": 2, "keep": 2}}))
    proc = subprocess.Popen(mpirun_command(kept_bin, 2, "train", job), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=mpi_env())
    try:
        deadline = time.monotonic() + 120
        while len(complete_checkpoints(output)) < 1 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.05)
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        victims = [int(pid) for pid in children if rank_of(int(pid)) == 1]
        assert victims, f"no rank 1 among mpirun's children {children}"
        killed_at = time.monotonic()
        os.kill(victims[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=DEAD_RANK_S)
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if "built without MPI" in stderr:
        pytest.skip("this kept was built without MPI")
    assert proc.returncode != 0, stderr
    assert elapsed < DEAD_RANK_S
    assert not (output / "final").exists()
    # Whatever was being written when the job ended stays a temporary (resume clears it): every
    # step-N directory is a complete checkpoint.
    steps = {p.name for p in (output / "checkpoints").iterdir()
             if re.fullmatch(r"step-\d+", p.name)}
    assert steps == {p.name for p in complete_checkpoints(output).values()}, steps
