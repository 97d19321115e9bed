"""`kept plan --gpus N`: the memory and time of a job over N data-parallel ranks, per ZeRO stage
(reference/plan.hpp, docs/scaling.md). Only `kept plan` runs, so the test is quick.

Every figure is per rank. With E the arena's elements (each parameter tensor's slot padded to 256
elements, kept/model/parameter_arena.hpp), f = (N - 1) / N and w the bytes of a weight (4 on the
CPU, 2 on cuda), the relations checked, on a small CPU job built here and on the 14B job
(reference/jobs/orion14b-llamion.json, shapes from its model_config; no weights needed):

1. memory: stage 1's optimizer states are stage 0's times the largest shard's share,
   ceil(ceil(E / 256) / N) x 256 / E (kept/dist/shard_layout.hpp); stage 2's gradients are the
   per-layer term of gradients "none"; stage 3's weights are the largest rank's part of the
   layers' span plus two gathered layers plus the parts outside the layers, less than stage 2's
   whole copy.
2. bytes a rank sends a step: stage 0's gradient all-reduce 2 f 4 E; stage 1 and 2 f (4 + w) E
   (gradient reduce-scatter + weight all-gather); time = calls x latency + bytes / bandwidth,
   with the InfiniBand share (N - 8) / (N - 1) over nodes of 8.
3. compute: a rank runs ceil(grad_accum / N) micro-batches, so its GEMM time equals one GPU's
   with that many; MFU is over the N GPUs; nothing hides on the CPU (MPI blocks).
4. `--gpus 1` is today's plan, figure for figure.
5. stage 3 is runnable when grad_accum is a multiple of N and flagged otherwise, and its
   per-layer gathers never hide (no prefetch yet); grad_accum < N is flagged; stage 2 or 3 with
   memory.gradients "buffer", --gpus 0 and a link out of reach are refused by name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kept_testing import expect_failure, run_kept

REPO = Path(__file__).resolve().parents[2]
JOB_14B = REPO / "reference" / "jobs" / "orion14b-llamion.json"
ALIGNMENT = 256  # kArenaAlignment
GIB = 1024.0**3
REL = 1e-9  # the planner's arithmetic is in double: relations hold to rounding


# ---------------------------------------------------------------------------------------------
# jobs and shapes
# ---------------------------------------------------------------------------------------------


def small_job(tmp_path: Path, **changes) -> Path:
    """The 14B job scaled down to a tiny Llama on the CPU (kept plan reads only the shapes).
    Eight layers: stage 3 holds two gathered layers and the parts outside the layers whole, so
    it holds fewer weights than stage 2 only once the shard saves more than that."""
    config = json.loads((REPO / "reference" / "jobs" / "orion14b-llama-config.json").read_text())
    config.update(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=4)
    (tmp_path / "small-config.json").write_text(json.dumps(config))
    job = json.loads(JOB_14B.read_text())
    job.update(model_config="small-config.json", device="cpu", batch_size=2, grad_accum=4,
               output=str(tmp_path / "never-written"))
    job["data"]["seq_len"] = 64
    job.update(changes)
    path = tmp_path / "small-job.json"
    path.write_text(json.dumps(job, indent=1))
    return path


def shapes(job_path: Path) -> dict:
    job = json.loads(job_path.read_text())
    return json.loads((job_path.parent / job["model_config"]).read_text())


def slot(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def arena(config: dict) -> tuple[int, int, int, int]:
    """(E, one layer's span, the span outside the layers, tensors a layer) of a Llama config
    (RMSNorm, no biases), counted here from the shapes, not read back from kept."""
    assert config["model_type"] == "llama" and not config.get("attention_bias")
    assert not config.get("mlp_bias")
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    assert config["num_key_value_heads"] == config["num_attention_heads"]
    layer = [h] + [h * h] * 4 + [h] + [h * i] * 3
    outside = [v * h, h, h * v]  # embedding, final norm, LM head
    layer_span = sum(map(slot, layer))
    outside_span = sum(map(slot, outside))
    return (config["num_hidden_layers"] * layer_span + outside_span, layer_span, outside_span,
            len(layer))


def largest_shard(elements: int, ranks: int) -> int:
    return -(-(-(-elements // ALIGNMENT)) // ranks) * ALIGNMENT


def largest_layer_shard(config: dict, ranks: int) -> int:
    """The most elements of the layers' span [embedding slot, + layers x layer span) that one
    rank's shard of the arena holds (kept/dist/shard_layout.hpp: the first blocks % N ranks get
    one block more)."""
    elements, layer_span, _, _ = arena(config)
    first = slot(config["vocab_size"] * config["hidden_size"])
    end = first + config["num_hidden_layers"] * layer_span
    base, extra = divmod(-(-elements // ALIGNMENT), ranks)
    best = 0
    for rank in range(ranks):
        lo = (rank * base + min(rank, extra)) * ALIGNMENT
        hi = lo + (base + (rank < extra)) * ALIGNMENT
        best = max(best, min(hi, end) - max(lo, first))
    return best


def plan_json(kept_bin, *args) -> dict:
    return json.loads(run_kept(kept_bin, "plan", *args, "--json").stdout)


def term(plan: dict, prefix: str) -> float:
    found = [t["bytes"] for t in plan["terms"] if t["name"].startswith(prefix)]
    assert len(found) == 1, (prefix, [t["name"] for t in plan["terms"]])
    return found[0]


def collective(plan: dict, name: str) -> dict:
    found = [c for c in plan["communication"]["collectives"] if c["name"] == name]
    assert len(found) == 1, (name, plan["communication"]["collectives"])
    return found[0]


def find(plans: list[dict], stage: int, **memory) -> dict:
    """The one plan of `stage` whose memory fields include `memory`."""
    found = [p for p in plans if p["zero_stage"] == stage
             and all(p["memory"][k] == v for k, v in memory.items())]
    assert len(found) == 1, (stage, memory, len(found))
    return found[0]


def close(a: float, b: float, rel: float = REL) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


# The strategy every relation below is read on: one of each, exact apart from the stage.
CPU_STRATEGY = dict(activation_checkpointing=False, teacher="resident", optimizer_states="fp32",
                    master_weights="fp32", states_on="device")
GPU_STRATEGY = dict(activation_checkpointing=True, teacher="resident", optimizer_states="int8",
                    master_weights="fp32", states_on="device")


# ---------------------------------------------------------------------------------------------
# 1 + 2: memory and bytes per stage
# ---------------------------------------------------------------------------------------------

CASES = {
    # name: (job maker, kept plan arguments, ranks, weight bytes, strategy)
    "cpu-2-ranks": ("small", ["--ranks", 2], 2, 4, CPU_STRATEGY),
    "cpu-3-ranks": ("small", ["--gpus", 3], 3, 4, CPU_STRATEGY),
    "14b-8xh100": ("14b", ["--gpu", "h100-80g", "--gpus", 8, "--set", "grad_accum=8",
                           "--host-memory", 2048], 8, 2, GPU_STRATEGY),
    "14b-16xh100-ib": ("14b", ["--gpu", "h100-80g", "--gpus", 16, "--set", "grad_accum=16",
                               "--host-memory", 2048], 16, 2, GPU_STRATEGY),
}


@pytest.fixture(params=sorted(CASES))
def case(request, kept_bin, tmp_path):
    maker, args, ranks, weight_bytes, strategy = CASES[request.param]
    job = small_job(tmp_path) if maker == "small" else JOB_14B
    out = plan_json(kept_bin, job, *args)
    return job, out, ranks, weight_bytes, strategy


def test_memory_per_stage(case):
    job, out, ranks, w, strategy = case
    assert out["ranks"] == ranks
    elements, layer_span, outside_span, _ = arena(shapes(job))
    plans = out["all"]
    # Stages 0-3 for every strategy, 2 and 3 only without a gradient buffer.
    assert {p["zero_stage"] for p in plans} == {0, 1, 2, 3}
    assert not [p for p in plans if p["zero_stage"] >= 2 and p["memory"]["gradients"] == "buffer"]
    s0 = find(plans, 0, gradients="buffer", **strategy)
    s0_none = find(plans, 0, gradients="none", **strategy)
    s1 = find(plans, 1, gradients="buffer", **strategy)
    s2 = find(plans, 2, gradients="none", **strategy)
    s3 = find(plans, 3, gradients="none", **strategy)
    assert close(term(s0, "student weights"), w * elements)

    # Stage 1: the states of the largest shard, within one aligned block of an even split.
    shard = largest_shard(elements, ranks)
    states0 = term(s0, "optimizer states")
    assert close(term(s1, "optimizer states"), states0 * shard / elements)
    assert abs(term(s1, "optimizer states") - states0 / ranks) <= states0 * ALIGNMENT / elements
    assert close(term(s1, "gradients"), term(s0, "gradients"))  # stage 1 keeps the buffer
    assert close(term(s1, "student weights"), term(s0, "student weights"))

    # Stage 2: the gradients of gradients "none" (one layer's + those outside the layers).
    assert close(term(s2, "gradients"), term(s0_none, "gradients"))
    assert close(term(s2, "gradients"), 4 * (layer_span + outside_span))
    assert close(term(s2, "optimizer states"), term(s1, "optimizer states"))

    # Stage 3: the layers' part of the shard + two gathered layers + the parts outside the layers.
    assert term(s3, "student weights") < term(s2, "student weights")
    assert close(term(s3, "student weights"),
                 w * (largest_layer_shard(shapes(job), ranks) + 2 * layer_span + outside_span))
    assert s3["device_bytes"] < s2["device_bytes"] < s0_none["device_bytes"]
    # The frozen teacher stays whole on every rank.
    assert close(term(s3, "teacher weights"), term(s0, "teacher weights"))


def test_bytes_moved_per_stage(case):
    job, out, ranks, w, strategy = case
    elements, layer_span, outside_span, per_layer = arena(shapes(job))
    layers = shapes(job)["num_hidden_layers"]
    f = (ranks - 1) / ranks
    plans = out["all"]
    s0 = find(plans, 0, gradients="buffer", **strategy)
    s0_none = find(plans, 0, gradients="none", **strategy)
    s1 = find(plans, 1, gradients="buffer", **strategy)
    s2 = find(plans, 2, gradients="none", **strategy)
    s3 = find(plans, 3, gradients="none", **strategy)

    assert close(collective(s0, "gradient all-reduce")["bytes"], 2 * f * 4 * elements)
    assert close(s0["communication"]["bytes"], 2 * f * 4 * elements)
    # Inside the backward walk, each layer's: the same bytes, one call a parameter tensor.
    reduce = collective(s0_none, "gradient all-reduce")
    assert close(reduce["bytes"], 2 * f * 4 * elements) and reduce["per_layer"]
    assert reduce["calls"] == layers * per_layer + 3
    for plan in (s1, s2):
        assert close(collective(plan, "gradient reduce-scatter")["bytes"], f * 4 * elements)
        assert close(collective(plan, "weight all-gather")["bytes"], f * w * elements)
        assert close(plan["communication"]["bytes"], f * (4 + w) * elements)
    # With a buffer the weights are gathered once at the end; without, each layer's right after
    # its update inside the walk, one call a parameter tensor.
    assert collective(s1, "weight all-gather")["calls"] == 1
    assert not collective(s1, "weight all-gather")["per_layer"]
    assert collective(s2, "weight all-gather")["calls"] == layers * per_layer + 3
    assert collective(s2, "weight all-gather")["per_layer"]
    # Stage 3: each layer gathered for every forward micro-batch and once for the backward, but
    # the last two, still there from the last forward.
    micro = out["micro_batches_per_rank"]
    gathers = collective(s3, "per-layer weight all-gather")
    assert gathers["calls"] == micro * layers + layers - 2
    assert close(gathers["bytes"], gathers["calls"] * f * w * layer_span)
    assert gathers["hidden_seconds"] == 0  # gathered when needed, not prefetched
    assert close(collective(s3, "weight all-gather")["bytes"], f * w * outside_span)

    # Time: calls x latency + bytes / bus bandwidth, the InfiniBand share over nodes of 8.
    link = s1["communication"]["interconnect"]
    assert link["name"] == ("shm" if w == 4 else "nvlink" if ranks <= 8 else "ib")
    remote = (ranks - 8) / (ranks - 1) if link["name"] == "ib" else 1.0
    assert close(link["remote_fraction"], remote)
    gather = collective(s1, "weight all-gather")
    expected = link["latency"] + max(
        gather["bytes"] * remote / link["bus_bandwidth"],
        gather["bytes"] * (1 - remote) / link["node_bandwidth"] if remote < 1 else 0)
    assert close(gather["seconds"], expected)
    for plan in plans:
        comm = plan["communication"]
        assert close(comm["bytes"], sum(c["bytes"] for c in comm["collectives"]))
        assert 0 <= comm["hidden_seconds"] <= comm["seconds"] + 1e-12
        assert close(plan["time_terms"]["communication (exposed)"],
                     comm["seconds"] - comm["hidden_seconds"], 1e-6)
        if w == 4:
            assert comm["hidden_seconds"] == 0  # the CPU's MPI communicator blocks
        for c in comm["collectives"]:
            if not c["per_layer"]:
                assert c["hidden_seconds"] == 0  # end-of-step collectives are exposed
    if w == 2:
        # A GPU hides the per-layer reduce-scatter and weight gather behind the next layer's
        # backward.
        assert collective(s2, "gradient reduce-scatter")["hidden_seconds"] > 0
        assert collective(s2, "weight all-gather")["hidden_seconds"] > 0


# ---------------------------------------------------------------------------------------------
# 3: compute per rank, MFU over the GPUs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ranks,accum", [(8, 8), (3, 8), (8, 13)])
def test_a_rank_computes_its_micro_batches(kept_bin, ranks, accum):
    common = ["--gpu", "h100-80g", "--host-memory", 2048]
    many = plan_json(kept_bin, JOB_14B, *common, "--gpus", ranks, "--set", f"grad_accum={accum}")
    per_rank = -(-accum // ranks)
    one = plan_json(kept_bin, JOB_14B, *common, "--set", f"grad_accum={per_rank}")
    assert many["micro_batches_per_rank"] == per_rank
    assert many["tokens_per_step"] == 4096 * accum  # the global batch, whatever the ranks
    a = find(many["all"], 1, gradients="none", **GPU_STRATEGY)
    b = find(one["all"], 0, gradients="none", **GPU_STRATEGY)
    for name in ("student GEMMs", "student attention", "recompute", "teacher forward"):
        assert close(a["time_terms"][name], b["time_terms"][name]), name
    # The same activations (the rank's micro-batches, layer-major) on both.
    assert close(term(a, "student activations"), term(b, "student activations"))
    # Model FLOPs of the global batch; MFU over the N GPUs (989.4 TFLOP/s dense bf16 each).
    assert close(a["model_flops_per_step"], b["model_flops_per_step"] * accum / per_rank)
    assert close(a["mfu"], a["model_flops_per_step"] / (a["step_seconds"] * 989.4e12 * ranks))
    assert close(a["step_seconds"], sum(a["time_terms"].values()))


# ---------------------------------------------------------------------------------------------
# 4: one rank is today's plan
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gpu", ["h100-80g", "a100-40g"])
def test_one_gpu_is_unchanged(kept_bin, gpu):
    args = [JOB_14B, "--gpu", gpu, "--host-memory", 512]
    without = plan_json(kept_bin, *args)
    with_one = plan_json(kept_bin, *args, "--gpus", 1)
    assert without["ranks"] == with_one["ranks"] == 1
    for key in ("plan", "runnable_plan"):
        if without[key] is None:
            assert with_one[key] is None
            continue
        assert with_one[key]["device_bytes"] == without[key]["device_bytes"]
        assert with_one[key]["step_seconds"] == without[key]["step_seconds"]
    assert [p["device_bytes"] for p in with_one["all"]] == [p["device_bytes"] for p in
                                                            without["all"]]
    for plan in with_one["all"]:
        assert plan["zero_stage"] == 0 and plan["ranks"] == 1
        assert plan["communication"]["bytes"] == 0 and not plan["communication"]["collectives"]
        assert "communication (exposed)" not in plan["time_terms"]
        assert "ZeRO" not in plan["strategy"]
    text = run_kept(kept_bin, "plan", *args, "--gpus", 1).stdout
    assert "ZeRO" not in text and "ranks:" not in text
    # The README's H100 plan (reference/jobs/orion14b-llamion.json, one GPU).
    if gpu == "h100-80g":
        assert round(without["plan"]["device_bytes"] / GIB, 2) == 63.63


# ---------------------------------------------------------------------------------------------
# 5: what is chosen, what is flagged, what is refused
# ---------------------------------------------------------------------------------------------


def test_stage_3_runs_when_every_rank_has_as_many_micro_batches(kept_bin, tmp_path):
    for job, args in ((small_job(tmp_path), ["--gpus", 2]),
                      (JOB_14B, ["--gpu", "h100-80g", "--gpus", 8, "--set", "grad_accum=8",
                                 "--host-memory", 2048])):
        out = plan_json(kept_bin, job, *args)
        stage3 = [p for p in out["all"] if p["zero_stage"] == 3]
        assert stage3 and all(p["runnable"] for p in stage3)
        assert out["stages"]["3"] is not None  # shown in the table of stages
        assert out["plan"]["runnable"] and out["runnable_plan"] == out["plan"]
        asked = plan_json(kept_bin, job, *args, "--set", "zero_stage=3")
        assert asked["job_plan"]["zero_stage"] == 3 and asked["job_plan"]["runnable"]
    # 12 micro-batches over 8 ranks: 2 on some, 1 on others, so the gathers would not pair up.
    uneven = plan_json(kept_bin, JOB_14B, "--gpu", "h100-80g", "--gpus", 8, "--set",
                       "grad_accum=12", "--host-memory", 2048)
    for plan in uneven["all"]:
        flagged = any("not a multiple of the 8 ranks" in why for why in plan["not_runnable"])
        assert flagged == (plan["zero_stage"] == 3), plan["not_runnable"]
    assert uneven["runnable_plan"]["zero_stage"] != 3


def test_the_job_stage_is_kept(kept_bin, tmp_path):
    job = small_job(tmp_path)
    for stage in (0, 1, 2):
        out = plan_json(kept_bin, job, "--gpus", 2, "--set", f"zero_stage={stage}")
        assert out["job_plan"]["zero_stage"] == stage and out["job_plan"]["runnable"]
        if stage == 2:
            assert out["job_plan"]["memory"]["gradients"] == "none"
    text = run_kept(kept_bin, "plan", job, "--gpus", 2, "--set", "zero_stage=1").stdout
    assert "the job's own memory fields:" in text and "ZeRO-1" in text


def test_too_few_micro_batches_are_flagged(kept_bin, tmp_path):
    job = small_job(tmp_path, grad_accum=3)
    out = plan_json(kept_bin, job, "--gpus", 4)
    assert "grad_accum 3" in out["error"]
    assert out["runnable_plan"] is None
    for plan in out["all"]:
        assert not plan["runnable"]
        assert any("grad_accum 3 below the 4 ranks" in why for why in plan["not_runnable"])
    text = run_kept(kept_bin, "plan", job, "--gpus", 4).stdout
    assert "NOT RUNNABLE: grad_accum 3 is below the 4 ranks" in text
    # Enough micro-batches (uneven: 2, 1, 1): runnable again.
    assert plan_json(kept_bin, job, "--gpus", 3)["runnable_plan"] is not None


@pytest.mark.parametrize("stage", [2, 3])
def test_sharded_gradients_with_a_buffer_are_refused(kept_bin, tmp_path, stage):
    job = small_job(tmp_path, zero_stage=stage, memory={"gradients": "buffer"})
    expect_failure(kept_bin, "plan", job, "--gpus", 2,
                   needles=[f"zero_stage {stage}", "memory.gradients", "none"])


def test_bad_flags_are_refused(kept_bin, tmp_path):
    job = small_job(tmp_path)
    for bad in (0, -2):
        expect_failure(kept_bin, "plan", job, "--gpus", bad, needles=["--gpus", str(bad)])
    expect_failure(kept_bin, "plan", JOB_14B, "--gpus", 16, "--interconnect", "nvlink",
                   "--set", "grad_accum=16", needles=["--interconnect nvlink", "16", "ib"])
    expect_failure(kept_bin, "plan", job, "--gpus", 2, "--interconnect", "ib",
                   needles=["--interconnect ib", "cpu job"])
    expect_failure(kept_bin, "plan", JOB_14B, "--gpus", 2, "--interconnect", "pcie",
                   needles=["--interconnect", "pcie"])
    # --interconnect ib on one node's worth of GPUs: every byte crosses a NIC.
    out = plan_json(kept_bin, JOB_14B, "--gpus", 8, "--interconnect", "ib", "--set",
                    "grad_accum=8")
    link = out["plan"]["communication"]["interconnect"]
    assert link["name"] == "ib" and link["remote_fraction"] == 1
