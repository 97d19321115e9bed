"""kept's HF tokenizer files (include/kept/io/hf_tokenizer.hpp) give SentencePiece's ids on both
transformers lines, and an Orion-layout checkpoint converts into one that loads without remote code.

The reference is SentencePiece itself with the source model's settings: text is split at the
special tokens written in it (as the source's HF tokenizer does: they are added tokens) and each
piece in between is encoded by SentencePiece on its own. Every check runs on transformers 5 (this
venv) and on the 4.x line (the <venv>-4x venv made by scripts/python_env.sh), through
tests/python/tokenizer_probe.py: AutoTokenizer fast, AutoTokenizer slow and, on 4.x, the
SentencePiece-backed LlamaTokenizer. Each SentencePiece normaliser setting is its own case.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from kept_testing import make_orion_source, randomize_, run_kept, Shape, SOURCE_DRAWS  # noqa: F401

HERE = Path(__file__).resolve().parent
PROBE = HERE / "tokenizer_probe.py"
SPECIALS = ("<unk>", "<s>", "</s>")

# Text that covers what users feed a tokenizer. Rare CJK characters and emoji are outside the
# small vocabularies trained here, so they exercise byte fallback.
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "안녕하세요, 세계! 한국어 문장입니다.",
    "你好，世界。这是一个中文句子。龘靐齉",
    "こんにちは世界。日本語の文です。カタカナ",
    "def f(x):\n    if x:\n        return x  # two spaces\n\treturn None\n",
    "spaces   in    runs\n\n\nand newlines\r\nend   ",
    "  leading spaces and a trailing one ",
    "emoji 😀🎉 and a rare one 🦩",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ and ligature ﬁ and ① ½",
    "special tokens as text: <s>Human: hi</s> and <unk> here",
    "</s>starts with a special token",
    "x",
]

CORPUS = "\n".join([
    "The quick brown fox jumps over the lazy dog. " * 3,
    "안녕하세요 세계 한국어 문장입니다 " * 3,
    "你好世界 这是一个中文句子 " * 3,
    "こんにちは世界 日本語の文です " * 3,
    "def f(x):\n    if x:\n        return x\n    return None\n" * 3,
    "Human: hello\n\nAssistant: hi there\n" * 3,
] * 20)

# name -> SentencePiece trainer settings (normaliser rule, whitespace, dummy prefix)
SETTINGS = {
    "orion": dict(normalization_rule_name="identity", remove_extra_whitespaces=False,
                  add_dummy_prefix=False),
    "dummy_prefix": dict(normalization_rule_name="identity", remove_extra_whitespaces=False,
                         add_dummy_prefix=True),
    "remove_whitespace": dict(normalization_rule_name="identity", remove_extra_whitespaces=True,
                              add_dummy_prefix=False),
    "nmt_nfkc": dict(normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True,
                     add_dummy_prefix=True),
    "nfkc": dict(normalization_rule_name="nfkc", remove_extra_whitespaces=False,
                 add_dummy_prefix=False),
}


def venv4_python() -> Path:
    """The 4.x line's interpreter: $KEPT_VENV_4X, else <this venv>-4x."""
    explicit = os.environ.get("KEPT_VENV_4X")
    venv = Path(explicit) if explicit else Path(sys.prefix + "-4x")
    python = venv / "bin" / "python"
    assert python.exists(), (f"{python} not found: run scripts/python_env.sh, which makes the "
                             "transformers 4.x venv beside the main one")
    return python


def probe(python: Path, directory: Path, texts=TEXTS, chat=None, logits_ids=None) -> dict:
    request = json.dumps({"dir": str(directory), "texts": texts, "chat": chat,
                          "logits_ids": logits_ids})
    done = subprocess.run([str(python), str(PROBE)], input=request, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{python} {PROBE} failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout)


LINES = {"5.x": lambda: Path(sys.executable), "4.x": venv4_python}


def train_spm(directory: Path, settings: dict, vocab: int = 500) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.split("\n")), model_writer=model, vocab_size=vocab,
        model_type="bpe", byte_fallback=True, character_coverage=0.9995, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2,
        **settings)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    return directory / "tokenizer.model"


def reference_ids(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
    """The source's ids: special tokens matched in the text, SentencePiece on each piece between."""
    ids: list[int] = []
    for part in re.split("(" + "|".join(map(re.escape, SPECIALS)) + ")", text):
        if part in SPECIALS:
            ids.append(sp.piece_to_id(part))
        elif part:
            ids.extend(sp.encode(part))
    return ids


def reference_decode(sp: spm.SentencePieceProcessor, text: str) -> str:
    """What decoding the source's ids gives: SentencePiece's decode of each piece, specials
    written as text."""
    out = []
    for part in re.split("(" + "|".join(map(re.escape, SPECIALS)) + ")", text):
        out.append(part if part in SPECIALS else sp.decode(sp.encode(part)) if part else "")
    return "".join(out)


@pytest.fixture(scope="module", params=list(SETTINGS))
def exported(request, kept_bin, tmp_path_factory):
    """A SentencePiece model with one setting, and `kept tokenizer --from` output for it."""
    root = tmp_path_factory.mktemp(f"spm-{request.param}")
    model = train_spm(root / "source", SETTINGS[request.param])
    run_kept(kept_bin, "tokenizer", "--from", str(model), "--output", str(root / "hf"))
    return request.param, model, root / "hf"


@pytest.mark.parametrize("line", list(LINES))
def test_ids_and_decoding_match_sentencepiece(exported, line):
    name, model, hf = exported
    sp = spm.SentencePieceProcessor(model_file=str(model))
    reply = probe(LINES[line](), hf)
    config = json.loads((hf / "tokenizer_config.json").read_text())
    expected_class = "LlamaTokenizer" if name == "orion" else "PreTrainedTokenizerFast"
    assert config["tokenizer_class"] == expected_class, config
    assert "auto_map" not in config and config["add_bos_token"] is False
    assert (hf / "tokenizer.model").read_bytes() == model.read_bytes()
    checked = 0
    for mode, result in reply["modes"].items():
        if "error" in result:
            # only a class without a slow twin may refuse use_fast=False
            assert mode == "auto_slow" and expected_class != "LlamaTokenizer", (mode, result)
            continue
        slow = mode != "auto" and "Fast" not in result["class"] and result["class"] != "TokenizersBackend"
        for text, ids, decoded in zip(TEXTS, result["ids"], result["decoded"]):
            want = reference_ids(sp, text)
            assert ids == want, (f"{line} {mode} ({result['class']}) on {name}: {text!r}\n"
                                 f"  got  {ids}\n  want {want}")
            has_special = any(s in text for s in SPECIALS)
            if slow and (has_special or text[:1].isspace()):
                continue  # the 4.x slow class spaces special tokens / drops a leading space
            if has_special and SETTINGS[name]["add_dummy_prefix"]:
                continue  # the dummy prefix after a special token is a real "▁": a space
            assert decoded == reference_decode(sp, text), (line, mode, name, text, decoded)
        # add_bos_token false: no bos when special tokens are added
        assert result["with_special"] == reference_ids(sp, TEXTS[0])
        checked += 1
    assert checked >= 1 + (line == "4.x")
    if name == "orion":  # identity settings: decoding gives the text back
        fast = reply["modes"]["auto"]
        assert fast["decoded"] == TEXTS


def test_normaliser_settings_are_read_from_the_model(exported):
    """The settings reach tokenizer.json: checked on the written file, per setting."""
    name, _, hf = exported
    settings = SETTINGS[name]
    tokenizer = json.loads((hf / "tokenizer.json").read_text())
    normalizers = (tokenizer["normalizer"] or {"normalizers": []})["normalizers"]
    kinds = [n["type"] for n in normalizers]
    assert ("Precompiled" in kinds) == (settings["normalization_rule_name"] != "identity"), kinds
    assert ("Prepend" in kinds) == settings["add_dummy_prefix"], kinds
    regexes = [n["pattern"].get("Regex") for n in normalizers if n["type"] == "Replace"]
    assert (" {2,}" in regexes) == settings["remove_extra_whitespaces"], regexes
    assert tokenizer["model"]["type"] == "BPE" and tokenizer["model"]["byte_fallback"] is True


def test_kept_tokenizer_trains_a_llama_tokenizer(kept_bin, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    run_kept(kept_bin, "tokenizer", "--input", str(corpus), "--vocab-size", "500", "--output",
             str(tmp_path / "tok"))
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json"):
        assert (tmp_path / "tok" / name).is_file(), name
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok" / "tokenizer.model"))
    for line, python in LINES.items():
        reply = probe(python(), tmp_path / "tok")
        result = reply["modes"]["auto"]
        assert result["class"] in ("LlamaTokenizer", "LlamaTokenizerFast"), (line, result["class"])
        assert result["ids"] == [reference_ids(sp, t) for t in TEXTS], line
        assert result["decoded"] == TEXTS, line


# ---------------------------------------------------------------------------------------------
# An Orion-layout source: two .bin shards, remote-code files, auto_map, inv_freq, LongChat RoPE
# ---------------------------------------------------------------------------------------------

ORION = Shape(vocab=520, hidden=32, inter=48, layers=2, heads=4, max_pos=320, theta=5e6, eps=1e-5)

ORION_CONFIG_EXTRA = {
    "auto_map": {"AutoConfig": "configuration_orion.OrionConfig",
                 "AutoModelForCausalLM": "modeling_orion.OrionForCausalLM"},
    "architectures": ["OrionForCausalLM"],
    "model_type": "orion",
}


def write_orion_checkpoint(directory: Path, model, tokenizer_model: Path) -> None:
    """The layout of the real Orion-14B release, scaled down."""
    directory.mkdir(parents=True)
    cfg = model.config
    config = {
        **ORION_CONFIG_EXTRA,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "hidden_act": "silu",
        "max_position_embeddings": ORION.max_pos, "rope_theta": ORION.theta,
        "rms_norm_eps": ORION.eps, "vocab_size": cfg.vocab_size, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32",
        "rope_scaling": None, "use_cache": True, "initializer_range": 0.02,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = list(state)
    # an old export's RoPE buffer, which holds no parameter
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(cfg.hidden_size // 8)
    names.append("model.layers.0.self_attn.rotary_emb.inv_freq")
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        file = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({n: state[n] for n in part}, directory / file)
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (directory / "configuration_orion.py").write_text("raise RuntimeError('remote code ran')\n")
    (directory / "modeling_orion.py").write_text("raise RuntimeError('remote code ran')\n")
    (directory / "tokenization_orion.py").write_text("raise RuntimeError('remote code ran')\n")
    (directory / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    special = {"content": "", "lstrip": False, "normalized": True, "rstrip": False,
               "single_word": False, "__type": "AddedToken"}
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_eos_token": False,
        "auto_map": {"AutoTokenizer": ["tokenization_orion.OrionTokenizer", None]},
        "bos_token": {**special, "content": "<s>"}, "eos_token": {**special, "content": "</s>"},
        "unk_token": {**special, "content": "<unk>"}, "pad_token": {**special, "content": "<unk>"},
        "clean_up_tokenization_spaces": False, "model_max_length": 4096, "sp_model_kwargs": {},
        "tokenizer_class": "OrionTokenizer"}, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}))
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": True,
         "temperature": 0.3, "top_p": 0.9, "repetition_penalty": 1.05,
         "transformers_version": "4.34.0"}))


@pytest.fixture(scope="module")
def orion(kept_bin, tmp_path_factory):
    root = tmp_path_factory.mktemp("orion")
    tokenizer = train_spm(root / "spm", SETTINGS["orion"])
    model = make_orion_source(ORION, 31, zero_final_bias=True)
    source = root / "Orion-14B-Chat"
    write_orion_checkpoint(source, model, tokenizer)
    out = run_kept(kept_bin, "convert", str(source), str(root / "llama"), "--opm", "exact",
                   "--chat-template", "orion")
    return model, source, root / "llama", out


def test_orion_layout_converts_without_remote_code(orion):
    _, source, dst, out = orion
    assert not list(dst.glob("*.py")), "remote-code files were copied"
    assert "skipped          1 tensor(s) that hold no parameter" in out.stdout, out.stdout
    assert "rotary_emb.inv_freq" in out.stdout
    assert "auto_map (remote code) dropped" in out.stdout
    config = json.loads((dst / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] == "llama"
    assert config["rope_theta"] == ORION.theta and config["max_position_embeddings"] == ORION.max_pos
    tok_config = json.loads((dst / "tokenizer_config.json").read_text())
    assert "auto_map" not in tok_config and tok_config["tokenizer_class"] == "LlamaTokenizer"
    assert tok_config["pad_token"] == "<unk>" and tok_config["model_max_length"] == 4096
    assert tok_config["add_bos_token"] is False and tok_config["add_eos_token"] is False
    generation = json.loads((dst / "generation_config.json").read_text())
    assert generation["temperature"] == 0.3 and generation["pad_token_id"] == 0
    assert (dst / "chat_template.jinja").read_text() == tok_config["chat_template"]
    for name in ("tokenizer.model", "tokenizer.json", "special_tokens_map.json"):
        assert (dst / name).is_file(), name


def test_orion_conversion_loads_on_both_lines_with_identical_ids_and_logits(orion):
    model, source, dst, _ = orion
    sp = spm.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "안녕?"}]
    want_chat = "<s>Human: What is 2+2?\n\nAssistant: </s>4</s>Human: 안녕?\n\nAssistant: </s>"
    ids = [[1, 5, 9, 200, 13, 2, 510, 7]]
    with torch.no_grad():
        want_logits = model(torch.tensor(ids)).logits
    replies = {line: probe(python(), dst, chat=chat, logits_ids=ids) for line, python in LINES.items()}
    for line, reply in replies.items():
        auto = reply["modes"]["auto"]
        assert "error" not in auto, (line, auto)
        assert auto["ids"] == [reference_ids(sp, t) for t in TEXTS], line
        assert auto["chat_text"] == want_chat, (line, auto["chat_text"])
        assert auto["chat_ids"] == reference_ids(sp, want_chat), line
        assert reply["model_class"] == "LlamaForCausalLM"
        got = torch.tensor(reply["logits"])
        rel = ((got - want_logits).abs().max() / want_logits.abs().max()).item()
        assert rel < 1e-4, f"{line}: converted logits differ from the Orion source by {rel:.2e}"
    assert replies["5.x"]["modes"]["auto"]["ids"] == replies["4.x"]["modes"]["auto"]["ids"]
    assert replies["4.x"]["modes"]["llama_slow"]["ids"] == replies["4.x"]["modes"]["auto"]["ids"]


# ---------------------------------------------------------------------------------------------
# kept inspect: the tokenizer report, and tensors and config checked against each other
# ---------------------------------------------------------------------------------------------


def test_inspect_reports_the_tokenizer(orion, kept_bin):
    _, source, dst, _ = orion
    out = run_kept(kept_bin, "inspect", str(dst)).stdout
    assert "tokenizer      LlamaTokenizer, SentencePiece bpe, 500 pieces (model vocabulary 520)" in out, out
    assert "without remote code  yes; has a chat template" in out, out
    assert "every tensor config.json implies" in out
    src = run_kept(kept_bin, "inspect", str(source)).stdout
    assert "OrionTokenizer" in src and "auto_map (remote code)" in src, src
    assert "1 without a parameter skipped" in src, src


def test_inspect_refuses_tensors_that_contradict_config(orion, kept_bin, tmp_path):
    from kept_testing import expect_failure
    _, _, dst, _ = orion
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in dst.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = ORION.inter + 2
    (bad / "config.json").write_text(json.dumps(config))
    expect_failure(kept_bin, "inspect", str(bad),
                   needles=["model.layers.0.mlp.", "has shape", "config.json implies"])
    config["intermediate_size"] = ORION.inter
    config["num_hidden_layers"] = 10**9
    (bad / "config.json").write_text(json.dumps(config))
    expect_failure(kept_bin, "inspect", str(bad), needles=["num_hidden_layers", "1000000000", "limit"])
