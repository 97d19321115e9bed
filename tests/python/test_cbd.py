"""Chain-based Distillation: `kept interpolate` and `kept chain` (include/kept/convert/resize.hpp,
reference/interpolate.cpp, reference/chain.hpp), checked against HF transformers and torch.

1. Growing a Llama (hidden, heads, FFN units, depth) preserves its function: transformers'
   logits of the grown checkpoint equal the source's (eps 0, float32 checkpoints).
2. Shrinking keeps the hidden coordinates that rank highest by the sum of squares of every
   weight reading or writing them, computed here independently in torch, in ranking order.
3. Interpolation: --alpha 0 and 1 give the anchors mapped alone, bit for bit; two copies of one
   model give it back; the default alpha is (N_A - N_T) / (N_A - N_B) from the parameter counts
   counted here; the weights are (1 - a) w_A + a w_B of the mapped anchors. Outputs load in
   transformers with trust_remote_code=False, tokenizer included.
4. `kept chain`: two anchors of decreasing size distilled stepwise (XKD-logit into a student of
   another width and depth: its loss falls), each an HF checkpoint of its shape whose teacher is
   the anchor before; a second run without --resume is refused; --resume skips finished
   anchors and redoes only a missing one.
5. Bad jobs and shapes fail with a message naming the field, and write nothing.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kept_testing import generated_documents, hf_logits, load_llama, run_kept, write_corpus

WORDS = ("the of and to in is was for on with as by at from that this model layer norm bias "
         "weight token residual stream anchor chain interpolate shrink grow").split()
VOCAB, HEAD_DIM = 320, 8


def llama_config(hidden: int, inter: int, layers: int, eps: float = 0.0) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=hidden // HEAD_DIM,
                       num_key_value_heads=hidden // HEAD_DIM, hidden_act="silu",
                       max_position_embeddings=128, rope_theta=1e4, rms_norm_eps=eps,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                       initializer_range=0.2, torch_dtype="float32")


def write_config(path: Path, config: LlamaConfig) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    return path / "config.json"


@pytest.fixture(scope="module")
def world(tmp_path_factory, kept_bin):
    root = tmp_path_factory.mktemp("cbd")
    corpus = write_corpus(root / "corpus.txt", generated_documents(4, 80, WORDS))
    run_kept(kept_bin, "tokenizer", "--input", corpus, "--vocab-size", 300, "--output",
             root / "tok")
    torch.manual_seed(0)
    source = root / "source"
    model = LlamaForCausalLM(llama_config(32, 64, 3)).eval()
    with torch.no_grad():  # norm weights away from 1, so that their mapping shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    model.save_pretrained(source, safe_serialization=True)
    shutil.copy(root / "tok" / "tokenizer.model", source / "tokenizer.model")
    return {"root": root, "corpus": corpus, "source": source, "model": model}


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (2, 17), generator=generator)


def interpolate(kept_bin, *args, check=True):
    return run_kept(kept_bin, "interpolate", *map(str, args), check=check)


def test_growing_preserves_the_function(world, kept_bin, tmp_path):
    want = hf_logits(world["model"], ids())
    for name, (hidden, inter, layers) in {"wider": (48, 64, 3), "ffn": (32, 96, 3),
                                          "deeper": (32, 64, 6), "all": (56, 112, 5)}.items():
        config = write_config(tmp_path / f"{name}-config", llama_config(hidden, inter, layers))
        out = tmp_path / name
        interpolate(kept_bin, world["source"], out, "--config", config)
        grown = load_llama(out)
        assert grown.config.hidden_size == hidden and grown.config.num_hidden_layers == layers
        got = hf_logits(grown, ids())
        error = float((got - want).abs().max() / want.abs().max())
        assert error < 1e-5, (name, error)
    # The tokenizer came along and loads without remote code.
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "all", trust_remote_code=False)
    assert tokenizer("the anchor chain")["input_ids"]


def test_shrinking_keeps_the_loudest_hidden_coordinates(world, kept_bin, tmp_path):
    config = write_config(tmp_path / "small-config", llama_config(16, 40, 2))
    out = tmp_path / "small"
    interpolate(kept_bin, world["source"], out, "--config", config)
    source = load_file(str(world["source"] / "model.safetensors"))
    small = load_file(str(out / "model.safetensors"))
    # The ranking, counted here: every column reading the stream, every row writing it.
    score = torch.zeros(32, dtype=torch.float64)
    for name, w in source.items():
        w = w.double()
        if name in ("model.embed_tokens.weight", "lm_head.weight") or any(
                name.endswith(f"{p}.weight") for p in ("q_proj", "k_proj", "v_proj", "gate_proj",
                                                         "up_proj")):
            score += (w ** 2).sum(0)
        elif name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
            score += (w ** 2).sum(1)
    top = torch.argsort(-score, stable=True)[:16]
    assert torch.equal(small["model.embed_tokens.weight"],
                       source["model.embed_tokens.weight"][:, top])
    assert torch.equal(small["lm_head.weight"], source["lm_head.weight"][:, top])
    # Depth 3 -> 2: the first and the last layer; target layer 1's norm is source layer 2's at
    # the kept coordinates, times one factor.
    layer2 = source["model.layers.2.post_attention_layernorm.weight"].double()[top]
    ratio = small["model.layers.1.post_attention_layernorm.weight"].double() / layer2
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))  # one factor, sqrt(share x 32 / 16)
    assert load_llama(out).config.num_hidden_layers == 2


def test_interpolation(world, kept_bin, tmp_path):
    source = world["source"]
    small_config = write_config(tmp_path / "b-config", llama_config(16, 32, 2))
    anchor_b = tmp_path / "b"
    interpolate(kept_bin, source, anchor_b, "--config", small_config)
    mid_config = write_config(tmp_path / "t-config", llama_config(24, 48, 2))
    mapped_a, mapped_b = tmp_path / "a-mapped", tmp_path / "b-mapped"
    interpolate(kept_bin, source, mapped_a, "--config", mid_config)
    interpolate(kept_bin, anchor_b, mapped_b, "--config", mid_config)

    def weights(directory):
        return load_file(str(directory / "model.safetensors"))

    for alpha, want in (("0", mapped_a), ("1", mapped_b)):
        out = tmp_path / f"alpha{alpha}"
        interpolate(kept_bin, source, anchor_b, out, "--config", mid_config, "--alpha", alpha)
        got, expected = weights(out), weights(want)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), alpha
    same = tmp_path / "same"
    interpolate(kept_bin, source, source, same, "--config", mid_config, "--alpha", "0.3")
    assert all(torch.equal(weights(same)[k], v) for k, v in weights(mapped_a).items())

    out = tmp_path / "default"
    proc = interpolate(kept_bin, source, anchor_b, out, "--config", mid_config)
    n_a, n_b = parameters(world["model"]), parameters(load_llama(anchor_b))
    n_t = parameters(load_llama(out))
    alpha = (n_a - n_t) / (n_a - n_b)
    printed = float(re.search(r"alpha ([\d.]+)", proc.stdout).group(1))
    assert printed == pytest.approx(alpha, abs=1e-4)
    recorded = json.loads((out / "kept_interpolation.json").read_text())
    assert recorded["alpha"] == pytest.approx(alpha, rel=1e-12)
    a, b, got = weights(mapped_a), weights(mapped_b), weights(out)
    for name, value in got.items():
        expected = (1 - alpha) * a[name].double() + alpha * b[name].double()
        assert torch.allclose(value.double(), expected, rtol=1e-6, atol=1e-7), name
    model = load_llama(out)
    assert torch.isfinite(hf_logits(model, ids())).all()
    AutoTokenizer.from_pretrained(out, trust_remote_code=False)


@pytest.mark.parametrize("case,make,needle", [
    ("vocab", lambda c: c.update(vocab_size=VOCAB + 8), "vocab_size 328"),
    ("head-dim", lambda c: c.update(num_attention_heads=2, num_key_value_heads=2,
                                    head_dim=12), "head_dim 12"),
    ("alpha", None, "--alpha"),
])
def test_bad_interpolations_are_refused(world, kept_bin, tmp_path, case, make, needle):
    config = llama_config(24, 48, 2).to_dict()
    if make:
        make(config)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    args = [world["source"], world["source"], tmp_path / "out", "--config", path]
    if case == "alpha":
        args += ["--alpha", "1.5"]
    proc = interpolate(kept_bin, *args, check=False)
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_anchor_without_tokenizer_is_refused(world, kept_bin, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(world["source"], bare)
    (bare / "tokenizer.model").unlink()
    config = write_config(tmp_path / "c", llama_config(16, 32, 2))
    proc = interpolate(kept_bin, bare, tmp_path / "out", "--config", config, check=False)
    assert proc.returncode != 0 and "no tokenizer.model" in proc.stderr
    assert not (tmp_path / "out").exists()


def chain_job(world, output: Path, **changes) -> dict:
    job = {
        "teacher": str(world["source"]),
        "output": str(output),
        "anchors": [
            {"name": "a24", "steps": 4,
             "config": {"hidden_size": 24, "num_attention_heads": 3, "num_key_value_heads": 3,
                        "intermediate_size": 48, "num_hidden_layers": 2}},
            {"name": "a16", "steps": 4,
             "config": {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 2,
                        "intermediate_size": 32, "num_hidden_layers": 2}},
        ],
        "train": {"data": {"train": str(world["corpus"]), "seq_len": 32, "held_out_fraction": 0.1,
                           "seed": 1},
                  "batch_size": 4, "optimizer": {"lr": 3e-3, "weight_decay": 0.0},
                  "eval": {"every": 0, "max_batches": 2}, "log_every": 1},
    }
    job.update(changes)
    return job


def train_losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["type"] == "train"]


def test_chain(world, kept_bin, tmp_path):
    output = tmp_path / "chain"
    job = tmp_path / "chain.json"
    job.write_text(json.dumps(chain_job(world, output)))
    proc = run_kept(kept_bin, "chain", job, "--quiet")
    summary = json.loads((output / "chain.json").read_text())
    assert [a["name"] for a in summary["anchors"]] == ["a24", "a16"]
    assert summary["anchors"][1]["teacher"] == str(output / "a24" / "run" / "final")
    for anchor, hidden in (("a24", 24), ("a16", 16)):
        model = load_llama(output / anchor / "run" / "final")
        assert model.config.hidden_size == hidden and model.config.num_hidden_layers == 2
        # XKD-logit into a student of another width and depth than its teacher: it learns.
        losses = train_losses(output / anchor / "run")
        assert len(losses) == 4 and losses[-1] < losses[0], (anchor, losses)
        assert json.loads((output / anchor / "train.json").read_text())["objective"] == "xkd-logit"
    assert "a24" in proc.stdout and "chain.json" in proc.stdout

    again = run_kept(kept_bin, "chain", job, "--quiet", check=False)
    assert again.returncode != 0 and "--resume" in again.stderr
    before = (output / "a24" / "run" / "metrics.jsonl").read_text()
    shutil.rmtree(output / "a16" / "run")
    resumed = run_kept(kept_bin, "chain", job, "--resume")
    assert "a24 finished before" in resumed.stderr
    assert (output / "a24" / "run" / "metrics.jsonl").read_text() == before  # not retrained
    assert len(train_losses(output / "a16" / "run")) == 4
    load_llama(output / "a16" / "run" / "final")


@pytest.mark.parametrize("case,change,needle", [
    ("not-smaller", lambda j: j["anchors"].reverse(), "anchors[1]: a24"),
    ("vocab", lambda j: j["anchors"][0]["config"].update(vocab_size=999), "vocab_size 999"),
    ("head-dim", lambda j: j["anchors"][0]["config"].update(num_attention_heads=4,
                                                             num_key_value_heads=4),
     "head_dim 6"),
    ("objective", lambda j: j["train"].update(objective="cross-entropy"), "train.objective"),
    ("unknown", lambda j: j.update(anchor=[]), "unknown field \"anchor\""),
    ("name", lambda j: j["anchors"][0].update(name="../x"), "plain directory name"),
    ("twice", lambda j: j["anchors"][1].update(name="a24"), "used twice"),
    ("steps", lambda j: j["anchors"][0].update(steps=0), "\"steps\" must be a positive integer"),
    ("empty", lambda j: j.update(anchors=[]), "non-empty array"),
    ("train-field", lambda j: j["train"].update(batch_size="four"), "batch_size"),
])
def test_bad_chain_jobs_are_refused(world, kept_bin, tmp_path, case, change, needle):
    output = tmp_path / "chain"
    job = chain_job(world, output)
    change(job)
    path = tmp_path / "chain.json"
    path.write_text(json.dumps(job))
    proc = run_kept(kept_bin, "chain", path, check=False)
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr
    assert not output.exists()
