"""Helpers shared by the pytest suites in tests/python (test_hf_parity.py, test_hf_convert.py,
test_trainer.py): finding and running the kept binary, tiny random HF models, token ids,
safetensors files read by hand, generated text.

Importing this module sets up the process for the suites: HF works offline and quietly (the
environment is set before transformers is first imported; conftest.py imports this module
before any test module), and torch uses 2 threads.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    StableLmConfig,
    StableLmForCausalLM,
)

torch.set_num_threads(2)
transformers.utils.logging.disable_progress_bar()

REPO_ROOT = Path(__file__).resolve().parents[2]
KEPT_TIMEOUT_S = 300  # the default time limit of one kept command
BATCH = 2  # the default batch of make_ids


# ---------------------------------------------------------------------------------------------
# the kept binary
# ---------------------------------------------------------------------------------------------


def find_kept_bin() -> Path:
    """The kept binary: env KEPT_BIN (ctest sets it), else build/reference/kept under the
    repository; fails the test (not an error) when there is none."""
    env = os.environ.get("KEPT_BIN", "").strip()
    if env:
        path = Path(env)
        if not path.is_file() or not os.access(path, os.X_OK):
            pytest.fail(f"KEPT_BIN={env!r} is not an executable file", pytrace=False)
        return path
    path = REPO_ROOT / "build" / "reference" / "kept"
    if path.is_file() and os.access(path, os.X_OK):
        return path
    pytest.fail(
        "the kept binary was not found: set KEPT_BIN=/path/to/kept, or build it at "
        f"{path} (cmake -S . -B build && cmake --build build --target kept); "
        "under ctest the hf_parity test passes KEPT_BIN itself",
        pytrace=False,
    )


def kept_env(threads: int | None = None) -> dict:
    """The environment of a kept process: OMP_NUM_THREADS=2 unless already set, or with
    `threads`, OMP_NUM_THREADS = OPENBLAS_NUM_THREADS = threads."""
    env = dict(os.environ)
    if threads is None:
        env.setdefault("OMP_NUM_THREADS", "2")
    else:
        env["OMP_NUM_THREADS"] = str(threads)
        env["OPENBLAS_NUM_THREADS"] = str(threads)
    return env


def run_kept(kept: Path, *args, check: bool = True, timeout_s: float = KEPT_TIMEOUT_S,
             threads: int | None = None) -> subprocess.CompletedProcess:
    """Runs `kept ARGS...`; with `check`, fails the test unless it exits 0."""
    cmd = [str(kept), *map(str, args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                              timeout=timeout_s, env=kept_env(threads), check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`{' '.join(cmd)}` did not finish in {timeout_s} s\n"
                    f"--- stderr ---\n{exc.stderr}", pytrace=False)
    if check and proc.returncode != 0:
        pytest.fail(f"`{' '.join(cmd)}` exited with status {proc.returncode}\n"
                    f"--- stderr ---\n{proc.stderr}\n--- stdout ---\n{proc.stdout}", pytrace=False)
    return proc


def expect_failure(kept: Path, *args, needles=(), timeout_s: float = KEPT_TIMEOUT_S,
                   threads: int | None = None) -> subprocess.CompletedProcess:
    """Runs `kept ARGS...`, which must exit with a status > 0 (not a signal) and mention every
    one of `needles` (str() of each) on stderr."""
    proc = run_kept(kept, *args, check=False, timeout_s=timeout_s, threads=threads)
    context = f"\n--- stderr ---\n{proc.stderr}\n--- stdout ---\n{proc.stdout}"
    assert proc.returncode != 0, f"kept {' '.join(map(str, args))} succeeded" + context
    assert proc.returncode > 0, f"kept died of signal {-proc.returncode}" + context
    missing = [n for n in needles if str(n) not in proc.stderr]
    assert not missing, f"kept's error message does not mention {missing}" + context
    return proc


def print_past_capture(request, lines: list[str]) -> None:
    """Prints `lines` from a session fixture's teardown, which runs while output is captured:
    the capture is lifted so the lines are shown."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + "\n".join(lines), flush=True)


# ---------------------------------------------------------------------------------------------
# tiny random HF models
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    heads: int
    inter: int
    layers: int
    theta: float
    eps: float
    max_pos: int = 256


def rope_theta_of(config) -> float:
    """transformers 5 keeps rope_theta in config.rope_parameters; older versions at top level."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(config.rope_theta)


def make_config(arch: str, s: Shape, attention_bias: bool = False, mlp_bias: bool = False):
    """"orion": a StableLmConfig that is the Orion computation (LayerNorm with bias, full rotary,
    sequential residual, no q/k bias or q/k norm); "llama": a LlamaConfig."""
    common = dict(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.inter,
                  num_hidden_layers=s.layers, num_attention_heads=s.heads,
                  num_key_value_heads=s.heads, hidden_act="silu", max_position_embeddings=s.max_pos,
                  rope_theta=s.theta, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if arch == "orion":
        assert not attention_bias and not mlp_bias
        # StableLmConfig defaults partial_rotary_factor to 0.25: the Orion computation needs 1.0.
        cfg = StableLmConfig(**common, layer_norm_eps=s.eps, partial_rotary_factor=1.0,
                             use_qkv_bias=False, use_parallel_residual=False, qk_layernorm=False)
        assert cfg.rope_parameters.get("partial_rotary_factor") == 1.0, cfg.rope_parameters
        assert cfg.num_key_value_heads == s.heads
    elif arch == "llama":
        cfg = LlamaConfig(**common, rms_norm_eps=s.eps, attention_bias=attention_bias,
                          mlp_bias=mlp_bias)
        assert cfg.head_dim == s.hidden // s.heads
    else:
        raise ValueError(arch)
    assert rope_theta_of(cfg) == s.theta
    return cfg


MODEL_CLASSES = {"orion": StableLmForCausalLM, "llama": LlamaForCausalLM}


@dataclass(frozen=True)
class Draws:
    """The normal distribution, (mean, std), each kind of parameter is re-drawn from.
    linear_bias None: the model must have no linear bias."""
    norm_weight: tuple[float, float] = (1.0, 0.2)
    norm_bias: tuple[float, float] = (0.0, 0.2)
    embedding: tuple[float, float] = (0.0, 1.0)
    linear_weight: tuple[float, float] = (0.0, 0.08)
    linear_bias: tuple[float, float] | None = (0.0, 0.05)


# Zero-mean parameters, so no bug can hide behind HF's init (unit norms, zero biases).
PARITY_DRAWS = Draws()
# An Orion source for the conversion: LayerNorm weights 1 + 0.2 n and biases 0.3 n, embedding
# N(0.5, 1) (the residual stream has a mean), linears N(0, 0.08); HF's init would hide exactly
# what the conversion is about.
SOURCE_DRAWS = Draws(norm_bias=(0.0, 0.3), embedding=(0.5, 1.0), linear_bias=None)


def randomize_(model: torch.nn.Module, seed: int, draws: Draws = PARITY_DRAWS) -> None:
    """Re-draws every parameter of `model` from `draws`, in module order from one generator."""
    gen = torch.Generator().manual_seed(seed)

    def draw(p, mean_std):
        mean, std = mean_std
        p.copy_(mean + std * torch.randn(p.shape, generator=gen, dtype=torch.float32))

    done = set()
    with torch.no_grad():
        for mod_name, mod in model.named_modules():
            is_norm = isinstance(mod, torch.nn.LayerNorm) or type(mod).__name__.endswith("RMSNorm")
            for p_name, p in mod.named_parameters(recurse=False):
                if is_norm:
                    draw(p, draws.norm_weight if p_name == "weight" else draws.norm_bias)
                elif isinstance(mod, torch.nn.Embedding):
                    draw(p, draws.embedding)
                elif isinstance(mod, torch.nn.Linear):
                    if p_name == "weight":
                        draw(p, draws.linear_weight)
                    else:
                        assert draws.linear_bias is not None, \
                            f"{mod_name}.{p_name}: the source has no linear bias"
                        draw(p, draws.linear_bias)
                else:
                    raise AssertionError(f"randomize_: no rule for {mod_name}.{p_name} ({type(mod)})")
                done.add(id(p))
    missed = [n for n, p in model.named_parameters() if id(p) not in done]
    assert not missed, f"randomize_ missed {missed}"


def make_orion_source(s: Shape, seed: int, zero_final_bias: bool = False) -> StableLmForCausalLM:
    """A random StableLM that is the Orion computation, parameters from SOURCE_DRAWS; with
    `zero_final_bias`, the final norm's bias (b_final) is 0."""
    model = StableLmForCausalLM(make_config("orion", s)).eval()
    randomize_(model, seed, SOURCE_DRAWS)
    if zero_final_bias:
        with torch.no_grad():
            model.model.norm.bias.zero_()
    return model


def load_hf_model(directory: Path, cls=LlamaForCausalLM, attn: str = "eager"):
    """`cls.from_pretrained(directory)` in fp32, which must load every tensor it expects and no
    other; in eval mode."""
    model, info = cls.from_pretrained(
        directory, trust_remote_code=False, dtype=torch.float32, attn_implementation=attn,
        output_loading_info=True)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), f"HF loading {directory}: {key} = {info.get(key)}"
    return model.eval()


def load_llama(directory: Path) -> LlamaForCausalLM:
    return load_hf_model(directory, LlamaForCausalLM)


# ---------------------------------------------------------------------------------------------
# token ids and logits
# ---------------------------------------------------------------------------------------------


def make_ids(vocab: int, seq: int, seed: int, batch: int = BATCH) -> torch.Tensor:
    """Random [batch, seq] ids that include both ends of the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen, dtype=torch.int64)
    ids[0, 0] = vocab - 1  # both ends of the vocabulary
    ids[-1, -1] = 0
    return ids


def write_ids(path: Path, ids: torch.Tensor) -> Path:
    save_file({"input_ids": ids.to(torch.int64).contiguous()}, str(path))
    return path


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The HF model's logits, in float64."""
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.double()


def kept_logits(kept: Path, model_dir: Path, ids: torch.Tensor, work: Path,
                **run_options) -> torch.Tensor:
    """The logits of `kept forward`, in float64; `run_options` go to run_kept."""
    work.mkdir(parents=True, exist_ok=True)
    ids_path, out_path = write_ids(work / "ids.safetensors", ids), work / "out.safetensors"
    run_kept(kept, "forward", model_dir, "--input", ids_path, "--out", out_path, **run_options)
    return load_file(str(out_path))["logits"].double()


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|."""
    assert tuple(got.shape) == tuple(ref.shape), (got.shape, ref.shape)
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# ---------------------------------------------------------------------------------------------
# safetensors, read by hand (a test never trusts the file it checks)
# ---------------------------------------------------------------------------------------------


def safetensors_header(path: Path) -> tuple[dict, int]:
    """The header of a safetensors file (without __metadata__) and where its data begins."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def checkpoint_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def checkpoint_dtypes(model_dir: Path) -> dict[str, str]:
    """tensor name -> safetensors dtype, over every file of a checkpoint."""
    dtypes = {}
    for f in checkpoint_files(model_dir):
        for name, info in safetensors_header(f)[0].items():
            dtypes[name] = info["dtype"]
    return dtypes


def raw_tensors(directory: Path) -> dict[str, tuple[str, list, bytes]]:
    """name -> (dtype, shape, bytes), read without trusting any library."""
    result = {}
    for f in checkpoint_files(directory):
        header, start = safetensors_header(f)
        data = f.read_bytes()
        for name, info in header.items():
            begin, end = info["data_offsets"]
            result[name] = (info["dtype"], info["shape"], data[start + begin:start + end])
    return result


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------


def generated_documents(seed: int, count: int, words: list[str]) -> list[str]:
    """`count` documents of 1 to 4 sentences of 5 to 15 of `words`."""
    rng = random.Random(seed)

    def sentence():
        return " ".join(rng.choice(words) for _ in range(rng.randint(5, 15))).capitalize() + "."

    return ["\n".join(sentence() for _ in range(rng.randint(1, 4))) for _ in range(count)]


def write_corpus(path: Path, documents: list[str]) -> Path:
    """A plain-text corpus: documents separated by blank lines."""
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return path


def split_documents(text: str) -> list[str]:
    """kept's plain-text corpus reader: documents are runs of non-blank lines."""
    if text.startswith("\ufeff"):
        text = text[1:]
    documents, current = [], []
    for line in text.split("\n"):
        if line.strip(" \t\r\f\v") == "":
            if current:
                documents.append("\n".join(current))
            current = []
        else:
            current.append(line)
    if current:
        documents.append("\n".join(current))
    return documents
