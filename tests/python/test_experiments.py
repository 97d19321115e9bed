"""`kept experiments` (reference/cmd_experiments.cpp), scaled down to seconds: every experiment
built so far runs end to end on a small generated corpus and writes its table (the claim, the
numbers, a verdict), its JSON and its plot; the numbers are held-out evaluations of checkpoints
the run wrote, which transformers loads; bad requests are refused without output.
"""

from __future__ import annotations

import json
import math

import pytest

from kept_testing import generated_documents, load_llama, run_kept, write_corpus

WORDS = ("the of and to in is was for on with as by at from that this model layer norm bias "
         "weight token residual stream mean centre claim verdict estimator logit hidden").split()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, kept_bin):
    root = tmp_path_factory.mktemp("experiments")
    corpus = write_corpus(root / "corpus.txt", generated_documents(7, 160, WORDS))
    output = root / "out"
    proc = run_kept(kept_bin, "experiments", "--corpus", corpus, "--vocab", 300, "--scale", 0.01,
                    "--output", output, timeout_s=600)
    return output, proc


def test_estimator(smoke):
    output, proc = smoke
    table = (output / "estimator" / "table.md").read_text()
    assert "unnecessary and strictly worse" in table and "Verdict:" in table
    data = json.loads((output / "estimator" / "table.json").read_text())
    inits = {row["init"] for row in data["before"]}
    assert inits == {"paper", "exact", "calibrated"}
    domains = {row["domain"] for row in data["before"] if row["init"] == "calibrated"}
    assert "in-domain" in domains
    for row in data["before"]:
        assert math.isfinite(row["kl"]) and row["kl"] >= 0 and row["perplexity"] > 1
    assert [row["init"] for row in data["after"]] == ["paper", "calibrated", "exact"]
    assert all(len(row["kl"]) == 3 for row in data["after"])  # three seeds
    assert (output / "estimator" / "estimator.png").stat().st_size > 1000
    # The calibrated conversions are complete Llama checkpoints.
    calibrated = sorted((output / "estimator").glob("calibrated-in-*"))
    assert calibrated
    load_llama(calibrated[-1])


def test_objectives(smoke):
    output, _ = smoke
    table = (output / "objectives" / "table.md").read_text()
    assert "converges faster" in table and "Verdict:" in table
    data = json.loads((output / "objectives" / "table.json").read_text())
    runs = {(run["objective"], run["seed"]) for run in data["runs"]}
    assert runs == {(o, s) for o in ("xkd-logit", "xkd-hidden") for s in (1, 2, 3)}
    assert all(run["curve"] for run in data["runs"])
    assert (output / "objectives" / "objectives.png").stat().st_size > 1000


def test_bad_requests_are_refused(smoke, kept_bin, tmp_path):
    output, _ = smoke
    proc = run_kept(kept_bin, "experiments", "--only", "nonsense", "--output", tmp_path / "x",
                    check=False)
    assert proc.returncode != 0 and "no experiment \"nonsense\"" in proc.stderr
    assert "estimator, objectives" in proc.stderr
    assert not (tmp_path / "x").exists()
    again = run_kept(kept_bin, "experiments", "--output", output, check=False)
    assert again.returncode != 0 and "--force" in again.stderr
    assert (output / "estimator" / "table.md").exists()  # untouched
