"""`kept compare RUN_DIR... --out curves.png` (reference/cmd_compare.cpp) on real runs.

Three tiny CPU runs of test_trainer.py's `world` (the reference, one at another learning rate,
one shorter than the 20-step tail) are compared; the printed table and its --json form must
equal the figures recomputed here from the runs' metrics.jsonl, and the chart must be a PNG.
Bad input (a missing run directory, a corrupt or incomplete record) fails naming the file
and the line, and leaves an existing chart untouched.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from test_trainer import (  # noqa: F401  (world is a fixture)
    base_job,
    expect_failure,
    merged,
    read_metrics,
    run_kept,
    world,
    write_job,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TAIL = 20  # kept compare's tail: the mean of the last 20 steps (or fewer)

# name -> the job's changes; "ref" comes first and is the reference.
RUNS = {
    "ref": {"steps": 26},
    "slow": {"steps": 26, "optimizer": {"lr": 1e-3}},
    "short": {"steps": 12, "optimizer": {"lr": 1e-3}},
}


@pytest.fixture(scope="module")
def runs(world, kept_bin) -> dict[str, Path]:
    outputs = {}
    for name, changes in RUNS.items():
        output = world.root / f"compare-{name}"
        job = write_job(world.root / f"compare-{name}.json",
                        merged(merged(base_job(world, output), {"grad_accum": 1}), changes))
        run_kept(kept_bin, "train", job)
        outputs[name] = output
    return outputs


def losses(output: Path) -> tuple[list[int], list[float]]:
    records = [r for r in read_metrics(output) if r["type"] == "train"]
    return [r["step"] for r in records], [r["loss"] for r in records]


def expected_rows(outputs: list[Path]) -> list[dict]:
    """The table recomputed from the metrics files, in kept compare's JSON field names."""
    ref_steps, ref = losses(outputs[0])
    rows = []
    for index, output in enumerate(outputs):
        steps, values = losses(output)
        points = min(TAIL, len(values))
        row = {"steps": len(values), "last_step": steps[-1], "first": values[0],
               "final": values[-1], "tail_points": points,
               "tail_mean": sum(values[-points:]) / points,
               "tail_vs_reference": None, "worst_step_difference": None, "shared_steps": 0}
        if index > 0:
            ref_points = min(points, len(ref))
            row["tail_vs_reference"] = row["tail_mean"] / (sum(ref[-ref_points:]) / ref_points) - 1
            by_step = dict(zip(ref_steps, ref))
            shared = [(v, by_step[s]) for s, v in zip(steps, values) if s in by_step]
            row["shared_steps"] = len(shared)
            row["worst_step_difference"] = max(abs(v - r) for v, r in shared) / abs(ref[0])
        rows.append(row)
    return rows


def close(a, b, rel: float) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-300)


def assert_rows_match(actual: list[dict], expected: list[dict], rel: float) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        for key, value in want.items():
            assert close(got[key], value, rel), (key, got, want)


def test_compare_json_and_table_match_the_metrics(runs, kept_bin, tmp_path):
    outputs = [runs["ref"], runs["slow"], runs["short"]]
    expected = expected_rows(outputs)
    # The runs differ where the test needs them to: a learning rate, a run shorter than the tail.
    assert expected[1]["worst_step_difference"] > 0 and expected[2]["tail_points"] == 12
    assert expected[2]["shared_steps"] == 12

    chart = tmp_path / "curves.png"
    out = json.loads(run_kept(kept_bin, "compare", *outputs, "--out", chart, "--json").stdout)
    assert chart.read_bytes().startswith(PNG_MAGIC)
    assert out["metric"] == "train_loss" and out["reference"] == "compare-ref"
    assert [r["label"] for r in out["runs"]] == [p.name for p in outputs]
    assert [Path(r["metrics"]) for r in out["runs"]] == [p / "metrics.jsonl" for p in outputs]
    # JSON carries the doubles themselves: the same arithmetic, so equal to the last bits but
    # for the order of a 20-term sum.
    assert_rows_match(out["runs"], expected, 1e-12)

    # The table: %.6g losses, the tail against the reference as a signed % with 3 decimals, the
    # worst difference as %.3e.
    text = run_kept(kept_bin, "compare", *outputs, "--out", chart,
                    "--labels", "fp32,low lr,short").stdout
    rows = [line for line in text.splitlines() if line.startswith("| ") and "steps" not in line]
    assert len(rows) == 3, text
    for label, line, want in zip(["fp32", "low lr", "short"], rows, expected):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == label and int(cells[1]) == want["steps"], line
        for cell, key in zip(cells[2:5], ("first", "final", "tail_mean")):
            assert close(float(cell), want[key], 1e-5), (key, line, want)
        if want["tail_vs_reference"] is None:
            assert cells[5] == "-" and cells[6] == "-", line
        else:
            assert re.fullmatch(r"[+-]\d+\.\d{3}%", cells[5]), line
            assert abs(float(cells[5][:-1]) - 100 * want["tail_vs_reference"]) <= 6e-4, line
            assert close(float(cells[6]), want["worst_step_difference"], 1e-3), line
    assert f"chart: {chart}" in text


def test_compare_other_metric_and_unfinished_last_line(runs, kept_bin, tmp_path):
    # Another field of the train records.
    out = json.loads(run_kept(kept_bin, "compare", runs["ref"], "--out", tmp_path / "g.png",
                              "--metric", "train_grad_norm", "--json").stdout)
    norms = [r["grad_norm"] for r in read_metrics(runs["ref"]) if r["type"] == "train"]
    assert out["runs"][0]["first"] == norms[0] and out["runs"][0]["final"] == norms[-1]
    # A last line without its newline is a record being written (or cut by a kill): skipped
    # with a note, the figures are those of the complete lines.
    live = tmp_path / "live"
    shutil.copytree(runs["slow"], live)
    with (live / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"type": "train", "step": 99, "lo')
    proc = run_kept(kept_bin, "compare", runs["ref"], live, "--out", tmp_path / "l.png", "--json")
    assert "unfinished last line" in proc.stderr
    assert_rows_match(json.loads(proc.stdout)["runs"], expected_rows([runs["ref"], runs["slow"]]),
                      1e-12)


def corrupt_copy(source: Path, destination: Path, line_number: int, text: str) -> Path:
    shutil.copytree(source, destination)
    path = destination / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[line_number - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_compare_bad_input_names_the_file_and_line(runs, kept_bin, tmp_path):
    chart = tmp_path / "curves.png"
    chart.write_bytes(b"an existing chart")
    missing = tmp_path / "no-such-run"
    expect_failure(kept_bin, "compare", runs["ref"], missing, "--out", chart,
                   needles=[str(missing), "no such run directory"])
    empty = tmp_path / "empty-run"
    empty.mkdir()
    expect_failure(kept_bin, "compare", runs["ref"], empty, "--out", chart,
                   needles=[str(empty / "metrics.jsonl"), "not found"])
    path = corrupt_copy(runs["slow"], tmp_path / "corrupt", 3, '{"type": "train", "step": 3,,}')
    expect_failure(kept_bin, "compare", runs["ref"], path.parent, "--out", chart,
                   needles=[f"{path}:3", "not valid JSON"])
    path = corrupt_copy(runs["slow"], tmp_path / "no-loss", 5, '{"type": "train", "step": 5}')
    expect_failure(kept_bin, "compare", runs["ref"], path.parent, "--out", chart,
                   needles=[f"{path}:5", '"loss"'])
    path = corrupt_copy(runs["slow"], tmp_path / "repeated", 4,
                        '{"type": "train", "step": 2, "loss": 1.0}')
    expect_failure(kept_bin, "compare", runs["ref"], path.parent, "--out", chart,
                   needles=[f"{path}:4", "steps must increase"])
    expect_failure(kept_bin, "compare", runs["ref"], runs["slow"], "--out", chart,
                   "--labels", "only-one", needles=["--labels", "1 label(s) for 2 run(s)"])
    expect_failure(kept_bin, "compare", runs["ref"], "--out", chart, "--metric", "eval_nothing",
                   needles=["eval", "--metric eval_nothing"])
    # Nothing was written over the existing chart.
    assert chart.read_bytes() == b"an existing chart"
