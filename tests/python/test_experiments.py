"""`kept experiments` (reference/cmd_experiments.cpp), scaled down to seconds: each of the five
experiments runs end to end on a small generated corpus and writes its table (the claim, the
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


def experiment(output, name: str, claim: str):
    """The experiment's directory and table.json, after checking its table.md states the claim
    and a verdict, and that the JSON carries the same verdict."""
    directory = output / name
    table = (directory / "table.md").read_text()
    assert claim in table and "Verdict:" in table
    data = json.loads((directory / "table.json").read_text())
    assert data["verdict"].startswith("Verdict:") and data["verdict"].strip() in table
    return directory, data


def test_estimator(smoke):
    output, proc = smoke
    _, data = experiment(output, "estimator", "unnecessary and strictly worse")
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
    _, data = experiment(output, "objectives", "converges faster")
    runs = {(run["objective"], run["seed"]) for run in data["runs"]}
    assert runs == {(o, s) for o in ("xkd-logit", "xkd-hidden") for s in (1, 2, 3)}
    assert all(run["curve"] for run in data["runs"])
    assert (output / "objectives" / "objectives.png").stat().st_size > 1000


def test_bad_requests_are_refused(smoke, kept_bin, tmp_path):
    output, _ = smoke
    proc = run_kept(kept_bin, "experiments", "--only", "nonsense", "--output", tmp_path / "x",
                    check=False)
    assert proc.returncode != 0 and "no experiment \"nonsense\"" in proc.stderr
    assert "weight-decay, estimator, two-domains, context-length, objectives" in proc.stderr
    assert not (tmp_path / "x").exists()
    again = run_kept(kept_bin, "experiments", "--output", output, check=False)
    assert again.returncode != 0 and "--force" in again.stderr
    assert (output / "estimator" / "table.md").exists()  # untouched


def safetensors_tensors(directory):
    from safetensors.numpy import load_file

    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def test_weight_decay(smoke):
    output, _ = smoke
    _, data = experiment(output, "weight-decay", "near-zero mean")
    teachers = data["teachers"]
    assert [(t["weight_decay"], t["decay_norms_and_biases"]) for t in teachers] == [
        (0.0, True), (0.1, True), (0.3, True), (0.1, False)]
    for teacher in teachers:
        # Every LayerNorm site: two per layer of the demo's 4 and the final norm.
        assert len(teacher["sites"]) == 9
        assert math.isfinite(teacher["paper_kl"]) and teacher["paper_kl"] >= 0
        for site in teacher["sites"]:
            assert 0 <= site["abs_mu_over_s_p50"] <= site["abs_mu_over_s_p99"]
            assert site["relative_gap"] >= -1e-12
    # |b| recomputed from the teacher's own checkpoint.
    tensors = safetensors_tensors(output / "weight-decay" / "teacher-wd0.3" / "final")
    for site in teachers[2]["sites"]:
        bias = tensors[site["site"] + ".bias"].astype("float64")
        assert abs(abs(bias).mean() - site["mean_abs_bias"]) <= 1e-6 * (1 + abs(bias).mean())
    assert (output / "weight-decay" / "weight-decay.png").stat().st_size > 1000
    load_llama(output / "weight-decay" / "paper-wd0.3")


def test_two_domains(smoke):
    output, _ = smoke
    directory, data = experiment(output, "two-domains", "absent from the transfer corpus")
    if data.get("skipped"):
        pytest.skip("no C headers on this machine")
    models = [row["model"] for row in data["rows"]]
    assert models[0].startswith("Orion teacher") and models[1].startswith("paper conversion")
    assert any(m.startswith("XKD-logit") for m in models) and any(m.startswith("UT") for m in models)
    for row in data["rows"][2:]:
        assert len(row["prose"]) == 3 and len(row["code"]) == 3  # three seeds
        for score in row["prose"] + row["code"]:
            assert math.isfinite(score["kl"]) and score["perplexity"] > 1
    # The held-out C headers are in no model's training text.
    trained = {json.loads(line)["text"] for line in (directory / "teacher-corpus.jsonl").open()}
    held_out = [json.loads(line)["text"] for line in (directory / "code-held-out.jsonl").open()]
    assert len(held_out) == data["code_eval_headers"] > 0
    assert not trained.intersection(held_out)
    assert any("#include" in text or "#define" in text for text in trained)
    assert (directory / "two-domains.png").stat().st_size > 1000
    load_llama(directory / "xkd-logit-seed1" / "final")


def test_context_length(smoke):
    output, _ = smoke
    directory, data = experiment(output, "context-length", "beyond the distillation length")
    starts = data["bucket_start"]
    assert starts[:3] == [0, 1, 2] and all(b == 2 * a for a, b in zip(starts[1:], starts[2:]))
    assert len(data["teacher"]) == len(starts) == len(data["paper"])
    assert [s["seq_len"] for s in data["students"]] == [32, 128]
    for student in data["students"]:
        assert len(student["runs"]) == 3
        for run in student["runs"]:
            assert len(run["perplexity_by_context"]) == len(starts)
            assert all(p > 1 for p in run["perplexity_by_context"])
    # The short students really trained on 32-token windows.
    job = json.loads((directory / "xkd-logit-32-seed1" / "job.json").read_text())
    assert job["data"]["seq_len"] == 32
    assert (directory / "context-length.png").stat().st_size > 1000
