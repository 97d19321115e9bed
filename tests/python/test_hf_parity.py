"""Third-party parity tests: the `kept` command against HF transformers (PyTorch, fp32, CPU).

Forward direction: small random checkpoints written by HF (`StableLmForCausalLM` configured as
the Orion computation, `LlamaForCausalLM` with and without attention/MLP biases; single file,
sharded with an index, bf16) are run through

    kept forward MODEL_DIR --input IDS.safetensors --out OUT.safetensors --hidden-states

and OUT's "logits" [B, T, vocab] and "hidden_states.0" .. "hidden_states.L" [B, T, hidden]
(embedding output, then each decoder layer's output, all BEFORE the final norm) must match HF:
max |kept - hf| <= 1e-4 * max |hf| for every tensor.

Reverse direction: `kept init --config CONFIG_JSON OUT_DIR --seed 7 --dtype f32|bf16` must write a
checkpoint that `LlamaForCausalLM.from_pretrained` loads with no missing or unexpected keys, the
right hyper-parameters and the requested storage dtype, and whose HF logits match kept's.

Bad input: `kept forward` must fail cleanly (exit status > 0, no signal, no output file) with a
message naming what is wrong.

The kept binary: env KEPT_BIN (ctest sets it), else build/reference/kept under the repository.
Measured relative errors are printed at the end of the session and, if env KEPT_PARITY_REPORT
names a file, written to it as JSON lines {case, tensor, max_abs_diff, max_abs_ref, rel}.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from kept_testing import (
    BATCH,
    MODEL_CLASSES,
    Shape,
    checkpoint_dtypes,
    checkpoint_files,
    load_hf_model,
    make_config,
    make_ids,
    print_past_capture,
    randomize_,
    rope_theta_of,
    run_kept,
    safetensors_header,
    write_ids,
)

REL_TOL = 1e-4  # max |diff| <= REL_TOL * max |reference|, per tensor


# ---------------------------------------------------------------------------------------------
# parity report
# ---------------------------------------------------------------------------------------------

_RECORDS: list[dict] = []


@pytest.fixture(scope="session", autouse=True)
def _parity_report(request):
    report = os.environ.get("KEPT_PARITY_REPORT", "").strip()
    if report:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text("")
    yield
    if not _RECORDS:
        return
    by_case: dict[str, list[dict]] = {}
    for rec in _RECORDS:
        by_case.setdefault(rec["case"], []).append(rec)
    lines = [f"kept vs HF transformers {transformers.__version__} / torch {torch.__version__} "
             f"(fp32 CPU; pass: rel <= {REL_TOL:g})",
             f"{'case':<44} {'logits rel':>11} {'worst state rel':>16}  worst state"]
    for case, recs in by_case.items():
        logit = [r["rel"] for r in recs if r["tensor"] == "logits"]
        states = [r for r in recs if r["tensor"] != "logits"]
        worst = max(states, key=lambda r: r["rel"]) if states else None
        lines.append(f"{case:<44} {logit[0] if logit else float('nan'):>11.3e} "
                     f"{worst['rel'] if worst else float('nan'):>16.3e}  "
                     f"{worst['tensor'] if worst else '-'}")
    lines.append(f"overall worst rel: {max(r['rel'] for r in _RECORDS):.3e} over {len(_RECORDS)} tensors")
    print_past_capture(request, lines)


def _record(case: str, tensor: str, max_abs_diff: float, max_abs_ref: float, rel: float) -> None:
    rec = {"case": case, "tensor": tensor, "max_abs_diff": max_abs_diff,
           "max_abs_ref": max_abs_ref, "rel": rel}
    _RECORDS.append(rec)
    print(f"[parity] {case} {tensor}: max|diff| {max_abs_diff:.3e} max|ref| {max_abs_ref:.3e} "
          f"rel {rel:.3e}")
    report = os.environ.get("KEPT_PARITY_REPORT", "").strip()
    if report:
        with open(report, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")


def compare(case: str, name: str, got: torch.Tensor, ref: torch.Tensor) -> str | None:
    """Records the error of one tensor; returns a failure message or None."""
    if got.dtype != torch.float32:
        return f"{name}: kept wrote dtype {got.dtype}, expected float32 (F32)"
    if tuple(got.shape) != tuple(ref.shape):
        return f"{name}: kept wrote shape {tuple(got.shape)}, HF has {tuple(ref.shape)}"
    if not torch.isfinite(got).all():
        return f"{name}: kept's output has {int((~torch.isfinite(got)).sum())} non-finite values"
    diff = (got.double() - ref.double()).abs()
    max_diff = diff.max().item()
    max_ref = ref.double().abs().max().item()
    rel = max_diff / max_ref if max_ref > 0 else (0.0 if max_diff == 0 else math.inf)
    _record(case, name, max_diff, max_ref, rel)
    if not rel <= REL_TOL:
        where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        return (f"{name}: max|diff| {max_diff:.3e} at {where} is {rel:.3e} x max|ref| {max_ref:.3e} "
                f"(limit {REL_TOL:g}); kept {got[where].item():.6g} vs HF {ref[where].item():.6g}")
    return None


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


ODD = Shape(vocab=1000, hidden=96, heads=3, inter=200, layers=2, theta=5e7, eps=1e-6)
SMALL = Shape(vocab=515, hidden=64, heads=4, inter=176, layers=3, theta=10000.0, eps=1e-5)
BIG = Shape(vocab=1536, hidden=256, heads=8, inter=688, layers=2, theta=500000.0, eps=1e-5)


def build_checkpoint(model_dir: Path, arch: str, s: Shape, seed: int, attention_bias=False,
                     mlp_bias=False, save: str = "single") -> None:
    cfg = make_config(arch, s, attention_bias, mlp_bias)
    model = MODEL_CLASSES[arch](cfg).eval()
    randomize_(model, seed)
    if save == "single":
        model.save_pretrained(model_dir, safe_serialization=True)
    elif save == "sharded":
        model.save_pretrained(model_dir, safe_serialization=True, max_shard_size="200KB")
    elif save == "bf16":
        model.to(torch.bfloat16).save_pretrained(model_dir, safe_serialization=True)
    else:
        raise ValueError(save)
    # the checkpoint is what the test says it is
    files = checkpoint_files(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if save == "sharded":
        assert index.is_file() and len(files) >= 2, f"expected a sharded save, got {files}"
        weight_map = json.loads(index.read_text())["weight_map"]
        assert len(set(weight_map.values())) == len(files)
    else:
        assert [f.name for f in files] == ["model.safetensors"] and not index.exists()
    dtypes = checkpoint_dtypes(model_dir)
    want = "BF16" if save == "bf16" else "F32"
    assert set(dtypes.values()) == {want}, dtypes
    assert "lm_head.weight" in dtypes and len(dtypes) == len(model.state_dict())


def hf_reference(model_dir: Path, cls, ids: torch.Tensor, attn: str = "eager"):
    """HF fp32 logits and the L+1 residual-stream states (before the final norm)."""
    model = load_hf_model(model_dir, cls, attn)
    n_layers = model.config.num_hidden_layers
    captured: dict = {}

    def keep(key):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            captured[key] = out.detach().clone()
        return hook

    handles = [model.model.embed_tokens.register_forward_hook(keep("embed"))]
    handles += [layer.register_forward_hook(keep(i)) for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    states = [captured["embed"]] + [captured[i] for i in range(n_layers)]
    # Cross-check the hooks against HF's own output_hidden_states: its first L entries are the
    # inputs of the layers (embedding output, outputs of layers 0..L-2); its last one is the
    # output of the last layer AFTER the final norm.
    hs = out.hidden_states
    assert len(hs) == n_layers + 1
    for i in range(n_layers):
        assert torch.equal(hs[i], states[i]), f"HF hidden_states[{i}] != hooked state {i}"
    with torch.no_grad():
        assert torch.allclose(hs[n_layers], model.model.norm(states[n_layers]), rtol=0, atol=1e-6)
    return out.logits.detach().float(), [s.float() for s in states], model


def kept_forward(kept: Path, model_dir: Path, ids: torch.Tensor, work: Path) -> dict:
    ids_path = write_ids(work / "ids.safetensors", ids)
    out_path = work / "out.safetensors"
    run_kept(kept, "forward", model_dir, "--input", ids_path, "--out", out_path, "--hidden-states")
    assert out_path.is_file(), f"kept forward exited 0 but wrote no {out_path}"
    header, _ = safetensors_header(out_path)
    bad = {k: v["dtype"] for k, v in header.items() if v["dtype"] != "F32"}
    assert not bad, f"kept wrote non-F32 tensors: {bad}"
    return load_file(str(out_path))


def check_parity(case: str, kept_out: dict, logits: torch.Tensor, states: list) -> None:
    n_states = len(states)
    expected = ["logits"] + [f"hidden_states.{i}" for i in range(n_states)]
    missing = [k for k in expected if k not in kept_out]
    assert not missing, f"{case}: kept's output lacks {missing}; it has {sorted(kept_out)}"
    extra = sorted(k for k in kept_out if k.startswith("hidden_states.") and k not in expected)
    assert not extra, f"{case}: kept wrote {extra} beyond the {n_states} residual states"
    failures = [compare(case, "logits", kept_out["logits"], logits)]
    failures += [compare(case, f"hidden_states.{i}", kept_out[f"hidden_states.{i}"], states[i])
                 for i in range(n_states)]
    failures = [f for f in failures if f]
    assert not failures, f"{case}: kept differs from HF:\n  " + "\n  ".join(failures)


def seed_of(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------
# forward direction: HF checkpoints -> kept forward
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    arch: str
    shape: Shape
    seq: int
    attention_bias: bool = False
    mlp_bias: bool = False
    save: str = "single"


FORWARD_CASES = [
    Case("orion-h96-odd", "orion", ODD, 37),
    Case("orion-h64-3layers", "orion", SMALL, 16),
    Case("orion-h64-T1", "orion", SMALL, 1),
    Case("orion-h256", "orion", BIG, 21),
    Case("orion-h64-sharded", "orion", SMALL, 9, save="sharded"),
    Case("orion-h96-bf16", "orion", ODD, 37, save="bf16"),
    Case("llama-h96-odd", "llama", ODD, 37),
    Case("llama-h96-odd-attnbias-mlpbias", "llama", ODD, 37, True, True),
    Case("llama-h64-attnbias", "llama", SMALL, 16, True, False),
    Case("llama-h64-mlpbias", "llama", SMALL, 16, False, True),
    Case("llama-h64-T1", "llama", SMALL, 1, True, True),
    Case("llama-h256-attnbias-mlpbias", "llama", BIG, 21, True, True),
    Case("llama-h64-sharded-attnbias-mlpbias", "llama", SMALL, 9, True, True, save="sharded"),
    Case("llama-h96-bf16-attnbias-mlpbias", "llama", ODD, 37, True, True, save="bf16"),
]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: c.name)
def test_forward_parity(case: Case, kept_bin: Path, tmp_path: Path):
    model_dir = tmp_path / "model"
    build_checkpoint(model_dir, case.arch, case.shape, seed_of(case.name), case.attention_bias,
                     case.mlp_bias, case.save)
    ids = make_ids(case.shape.vocab, case.seq, seed_of(case.name) + 1)
    # bf16: HF's fp32 forward of the bf16-rounded weights (from_pretrained upcasts to fp32)
    logits, states, _ = hf_reference(model_dir, MODEL_CLASSES[case.arch], ids)
    assert logits.shape == (BATCH, case.seq, case.shape.vocab)
    assert len(states) == case.shape.layers + 1
    check_parity(case.name, kept_forward(kept_bin, model_dir, ids, tmp_path), logits, states)


@pytest.mark.parametrize("arch", ["orion", "llama"])
def test_forward_parity_sdpa(arch: str, kept_bin: Path, tmp_path: Path):
    """The reference is not an artefact of HF's eager attention: sdpa agrees, and so does kept."""
    name = f"{arch}-h96-sdpa"
    model_dir = tmp_path / "model"
    build_checkpoint(model_dir, arch, ODD, seed_of(name), arch == "llama", arch == "llama")
    ids = make_ids(ODD.vocab, 37, seed_of(name) + 1)
    eager_logits, eager_states, _ = hf_reference(model_dir, MODEL_CLASSES[arch], ids, "eager")
    sdpa_logits, sdpa_states, model = hf_reference(model_dir, MODEL_CLASSES[arch], ids, "sdpa")
    assert model.config._attn_implementation == "sdpa"
    failures = [compare(f"{name}:sdpa-vs-eager", "logits", sdpa_logits, eager_logits)]
    failures += [compare(f"{name}:sdpa-vs-eager", f"hidden_states.{i}", s, e)
                 for i, (s, e) in enumerate(zip(sdpa_states, eager_states))]
    failures = [f for f in failures if f]
    assert not failures, "HF sdpa differs from HF eager:\n  " + "\n  ".join(failures)
    check_parity(name, kept_forward(kept_bin, model_dir, ids, tmp_path), sdpa_logits, sdpa_states)


# ---------------------------------------------------------------------------------------------
# reverse direction: kept init -> HF from_pretrained
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InitCase:
    name: str
    shape: Shape
    attention_bias: bool
    mlp_bias: bool
    dtype: str


INIT_CASES = [
    InitCase("init-llama-h64-f32", SMALL, False, False, "f32"),
    InitCase("init-llama-h96-attnbias-mlpbias-f32", ODD, True, True, "f32"),
    InitCase("init-llama-h64-mlpbias-f32", SMALL, False, True, "f32"),
    InitCase("init-llama-h64-attnbias-bf16", SMALL, True, False, "bf16"),
    InitCase("init-llama-h96-attnbias-mlpbias-bf16", ODD, True, True, "bf16"),
]


def write_llama_config(path: Path, s: Shape, attention_bias: bool, mlp_bias: bool) -> Path:
    make_config("llama", s, attention_bias, mlp_bias).to_json_file(str(path))
    return path


@pytest.mark.parametrize("case", INIT_CASES, ids=lambda c: c.name)
def test_init_loads_in_hf(case: InitCase, kept_bin: Path, tmp_path: Path):
    s = case.shape
    cfg_path = write_llama_config(tmp_path / "source_config.json", s, case.attention_bias,
                                  case.mlp_bias)
    out_dir = tmp_path / "kept_init"
    run_kept(kept_bin, "init", "--config", cfg_path, out_dir, "--seed", 7, "--dtype", case.dtype)
    assert (out_dir / "config.json").is_file(), f"kept init wrote no {out_dir / 'config.json'}"
    files = checkpoint_files(out_dir)
    assert files, f"kept init wrote no *.safetensors into {out_dir}"

    model, info = LlamaForCausalLM.from_pretrained(
        out_dir, trust_remote_code=False, dtype=torch.float32, attn_implementation="eager",
        output_loading_info=True)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), f"HF loading kept's checkpoint: {key} = {info.get(key)}"
    cfg = model.config
    assert type(cfg) is LlamaConfig and cfg.model_type == "llama"
    got = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
               intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
               num_attention_heads=cfg.num_attention_heads,
               num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
               hidden_act=cfg.hidden_act, attention_bias=cfg.attention_bias,
               mlp_bias=cfg.mlp_bias, tie_word_embeddings=bool(cfg.tie_word_embeddings))
    want = dict(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.inter,
                num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
                head_dim=s.hidden // s.heads, hidden_act="silu",
                attention_bias=case.attention_bias, mlp_bias=case.mlp_bias,
                tie_word_embeddings=False)
    assert got == want
    assert math.isclose(cfg.rms_norm_eps, s.eps, rel_tol=1e-9), cfg.rms_norm_eps
    assert math.isclose(rope_theta_of(cfg), s.theta, rel_tol=1e-9), rope_theta_of(cfg)
    if isinstance(getattr(cfg, "rope_parameters", None), dict):
        assert cfg.rope_parameters.get("rope_type", "default") == "default", cfg.rope_parameters

    # the files hold what --dtype asked for, and real (non-degenerate) random weights
    want_dtype = {"f32": "F32", "bf16": "BF16"}[case.dtype]
    dtypes = checkpoint_dtypes(out_dir)
    assert set(dtypes) == set(model.state_dict()), "tensor names differ from HF's"
    wrong = {k: v for k, v in dtypes.items() if v != want_dtype}
    assert not wrong, f"--dtype {case.dtype}: expected every tensor {want_dtype}, got {wrong}"
    for name, p in model.state_dict().items():
        if p.dim() == 2:
            assert p.float().std() > 0, f"{name} is constant"

    ids = make_ids(s.vocab, 23, seed_of(case.name))
    logits, states, _ = hf_reference(out_dir, LlamaForCausalLM, ids)
    check_parity(case.name, kept_forward(kept_bin, out_dir, ids, tmp_path), logits, states)


def test_init_seed_is_deterministic(kept_bin: Path, tmp_path: Path):
    cfg_path = write_llama_config(tmp_path / "source_config.json", SMALL, True, True)

    def tensors(seed, sub):
        out = tmp_path / sub
        run_kept(kept_bin, "init", "--config", cfg_path, out, "--seed", seed, "--dtype", "f32")
        result = {}
        for f in checkpoint_files(out):
            result.update(load_file(str(f)))
        return result

    a, b, c = tensors(7, "a"), tensors(7, "b"), tensors(8, "c")
    assert sorted(a) == sorted(b) == sorted(c)
    assert all(torch.equal(a[k], b[k]) for k in a), "kept init --seed 7 twice gave different weights"
    assert any(not torch.equal(a[k], c[k]) for k in a), "kept init --seed 7 and --seed 8 agree"


# ---------------------------------------------------------------------------------------------
# bad input: kept forward must fail cleanly and say why
# ---------------------------------------------------------------------------------------------

BAD_SHAPE = Shape(vocab=515, hidden=64, heads=4, inter=176, layers=2, theta=10000.0, eps=1e-5)
DROPPED = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def good_checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("good")
    dirs = {"single": root / "single", "sharded": root / "sharded"}
    for save, d in dirs.items():
        build_checkpoint(d, "llama", BAD_SHAPE, seed_of("bad-input"), True, True, save)
    return dirs


def expect_rejection(kept: Path, model_dir: Path, ids: torch.Tensor, work: Path,
                     *needles: str) -> str:
    ids_path = write_ids(work / "ids.safetensors", ids)
    out_path = work / "out.safetensors"
    proc = run_kept(kept, "forward", model_dir, "--input", ids_path, "--out", out_path,
                    "--hidden-states", check=False)
    context = f"\n--- stderr ---\n{proc.stderr}\n--- stdout ---\n{proc.stdout}"
    assert proc.returncode != 0, "kept forward accepted bad input" + context
    assert proc.returncode > 0, f"kept forward died of signal {-proc.returncode}" + context
    assert not out_path.exists(), f"kept forward failed but left {out_path} behind" + context
    missing = [n for n in needles if n not in proc.stderr]
    assert not missing, f"kept's error message does not mention {missing}" + context
    return proc.stderr


def ok_ids(seq: int = 5) -> torch.Tensor:
    return make_ids(BAD_SHAPE.vocab, seq, 3)


def test_rejects_missing_tensor(kept_bin, good_checkpoints, tmp_path):
    model_dir = shutil.copytree(good_checkpoints["single"], tmp_path / "model")
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    del tensors[DROPPED]
    save_file(tensors, str(path), metadata={"format": "pt"})
    expect_rejection(kept_bin, model_dir, ok_ids(), tmp_path, DROPPED, "model.safetensors")


def test_rejects_tensor_missing_from_its_shard(kept_bin, good_checkpoints, tmp_path):
    model_dir = shutil.copytree(good_checkpoints["sharded"], tmp_path / "model")
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map[DROPPED]
    tensors = load_file(str(model_dir / shard))
    del tensors[DROPPED]
    save_file(tensors, str(model_dir / shard), metadata={"format": "pt"})
    expect_rejection(kept_bin, model_dir, ok_ids(), tmp_path, DROPPED, shard)


def test_rejects_unknown_model_type(kept_bin, good_checkpoints, tmp_path):
    model_dir = shutil.copytree(good_checkpoints["single"], tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "gpt_bogus_arch"
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    expect_rejection(kept_bin, model_dir, ok_ids(), tmp_path, "model_type", "gpt_bogus_arch")


@pytest.mark.parametrize("keep_bytes", ["in-data", "in-header"])
def test_rejects_truncated_safetensors(keep_bytes, kept_bin, good_checkpoints, tmp_path):
    model_dir = shutil.copytree(good_checkpoints["single"], tmp_path / "model")
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    cut = len(data) - 4096 if keep_bytes == "in-data" else 8 + header_len // 2
    assert 8 + header_len < len(data) - 4096
    path.write_bytes(data[:cut])
    expect_rejection(kept_bin, model_dir, ok_ids(), tmp_path, "model.safetensors")


@pytest.mark.parametrize("bad_id", [BAD_SHAPE.vocab + 7, -5])
def test_rejects_token_id_out_of_range(bad_id, kept_bin, good_checkpoints, tmp_path):
    ids = ok_ids(6)
    ids[1, 3] = bad_id
    expect_rejection(kept_bin, good_checkpoints["single"], ids, tmp_path, str(bad_id),
                     str(BAD_SHAPE.vocab))


# ---------------------------------------------------------------------------------------------
# the reference itself
# ---------------------------------------------------------------------------------------------


def test_reference_versions_are_the_pinned_ones():
    """Parity figures name the third-party code they were measured against: the pinned one."""
    pins = {}
    for line in (Path(__file__).with_name("requirements.txt")).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    installed = {"torch": torch.__version__.split("+", 1)[0], "transformers": transformers.__version__,
                 "safetensors": safetensors.__version__}
    stale = {k: (installed[k], pins[k]) for k in installed if k in pins and installed[k] != pins[k]}
    assert not stale, (f"installed (got, pinned) versions differ: {stale}; "
                       "run scripts/python_env.sh to update the venv")
