"""The memory planner and the memory strategies (reference/plan.hpp, job field "memory").

1. `kept plan`'s predicted peak matches the peak kept's allocator measured during training
   (kept/core/memory_meter.hpp) within 5%, on the CPU and on the CUDA backend (emulated in a
   KEPT_CUDA_EMULATION build), for several objectives and strategies.
2. Strategies that do not change the math give bit-identical loss sequences: activation
   checkpointing on/off, the teacher resident/streamed.
3. `kept plan` on the 14B job (reference/jobs/orion14b-llamion.json) finds a fitting plan for
   h100-80g and h200-141g; its JSON has every term; bad input (an unknown GPU, a job that
   cannot fit, a strategy kept train cannot run yet) fails before anything is loaded, naming
   the field or the shortfall.
4. `kept train --synthetic` runs a scaled-down job with random weights and tokens, writes
   nothing, and prints its step time, tokens/s, MFU, peak memory and projected hours.

The tiny models, tokenizer and corpus come from test_trainer.py's `world` fixture.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_trainer import (  # noqa: F401  (world is a fixture)
    KEPT_THREADS,
    base_job,
    expect_failure,
    merged,
    read_metrics,
    run_kept,
    train_trace,
    world,
    write_job,
)

REPO = Path(__file__).resolve().parents[2]
JOB_14B = REPO / "reference" / "jobs" / "orion14b-llamion.json"
PEAK_TOLERANCE = 0.05  # |measured / planned - 1|, the bound

STRATEGY_CHANGES = {
    "resident": {},
    "checkpointing": {"memory": {"activation_checkpointing": True}},
    "streamed": {"memory": {"teacher": "streamed"}},
    "both": {"memory": {"activation_checkpointing": True, "teacher": "streamed"}},
}
OBJECTIVE_CHANGES = {
    "xkd-logit": {},
    "ce": {"objective": "ce", "teacher": ""},
    "xkd-hidden": {"objective": "xkd-hidden"},
}


def skip_without_cuda(proc) -> None:
    if proc.returncode != 0 and "built without the CUDA backend" in proc.stderr:
        pytest.skip("this kept has no CUDA backend (no nvcc, KEPT_CUDA_EMULATION off)")
    if proc.returncode != 0 and "no usable CUDA device" in proc.stderr:
        pytest.skip("a GPU build of kept on a machine without a GPU")


def memory_record(output: Path) -> dict:
    records = [r for r in read_metrics(output) if r["type"] == "memory"]
    assert len(records) == 1, records
    return records[0]


def train(world, kept_bin, tmp_path: Path, name: str, changes: dict):
    output = tmp_path / name
    job = merged(merged(base_job(world, output), {"steps": 3}), changes)
    path = write_job(tmp_path / f"{name}.json", job)
    proc = run_kept(kept_bin, "train", path, check=False, threads=KEPT_THREADS)
    skip_without_cuda(proc)
    assert proc.returncode == 0, proc.stderr
    return output, proc


# Every strategy on the CPU; on the (emulated, slower) CUDA backend the two extremes.
PEAK_CASES = [(device, strategy, objective)
              for device, strategies in (("cpu", sorted(STRATEGY_CHANGES)),
                                         ("cuda", ["resident", "both"]))
              for strategy in strategies for objective in sorted(OBJECTIVE_CHANGES)
              if not (objective == "ce" and strategy in ("streamed", "both"))]


@pytest.mark.parametrize("device,strategy,objective", PEAK_CASES)
def test_planned_peak_matches_measured(world, kept_bin, tmp_path, device, strategy, objective):
    changes = merged(merged(OBJECTIVE_CHANGES[objective], STRATEGY_CHANGES[strategy]),
                     {"device": device, "grad_accum": 2})
    output, proc = train(world, kept_bin, tmp_path, f"{device}-{strategy}-{objective}", changes)
    record = memory_record(output)
    measured, planned = record["peak_bytes"], record["predicted_bytes"]
    assert abs(measured / planned - 1) <= PEAK_TOLERANCE, (measured, planned, proc.stderr)
    assert "memory: peak" in proc.stderr


def final_bytes(output: Path) -> bytes:
    return (output / "final" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("device,objective",
                         [("cpu", "xkd-logit"), ("cuda", "xkd-logit"), ("cpu", "xkd-hidden")])
def test_exact_strategies_give_identical_losses(world, kept_bin, tmp_path, device, objective):
    """Checkpointing and streaming change where bytes live, not one bit of the numbers."""
    common = merged(OBJECTIVE_CHANGES[objective], {"device": device, "grad_accum": 2,
                                                   "steps": 4})
    runs = {}
    for name in ("resident", "checkpointing", "streamed", "both"):
        output, _ = train(world, kept_bin, tmp_path, f"{device}-{objective}-{name}",
                          merged(common, STRATEGY_CHANGES[name]))
        runs[name] = (train_trace(output), final_bytes(output))
    reference = runs.pop("resident")
    assert len(reference[0]) == 4
    for name, run in runs.items():
        assert run[0] == reference[0], name
        assert run[1] == reference[1], name
