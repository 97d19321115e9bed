"""Loads a checkpoint directory with the transformers this interpreter has and reports what it
does, as JSON on stdout. tests/python/test_hf_tokenizer.py runs it under both transformers lines
(the main venv's 5.x and the <venv>-4x venv's 4.x), so one script asks both the same questions.

Request (JSON on stdin):
  {"dir": path, "texts": [str], "chat": [messages] or null, "logits_ids": [[int]] or null}
Reply: {"version": str, "modes": {mode: {"class", "ids", "decoded", "chat_text", "chat_ids"}
        or {"error": str}}, "logits": [[[float]]] or null}
Modes: "auto" (AutoTokenizer, the default fast path), "auto_slow" (AutoTokenizer with
use_fast=False) and, on 4.x, "llama_slow" (LlamaTokenizer, the SentencePiece-backed class).
Everything loads with trust_remote_code=False and offline.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import transformers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402


def probe(tokenizer, texts, chat):
    out = {"class": type(tokenizer).__name__, "ids": [], "decoded": []}
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        out["ids"].append(ids)
        out["decoded"].append(tokenizer.decode(ids))
    out["with_special"] = tokenizer.encode(texts[0]) if texts else []
    if chat is not None:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        out["chat_text"] = text
        out["chat_ids"] = tokenizer.encode(text, add_special_tokens=False)
    return out


def main() -> None:
    request = json.load(sys.stdin)
    directory, texts, chat = request["dir"], request["texts"], request.get("chat")
    loaders = {
        "auto": lambda: AutoTokenizer.from_pretrained(directory, trust_remote_code=False),
        "auto_slow": lambda: AutoTokenizer.from_pretrained(directory, use_fast=False,
                                                           trust_remote_code=False),
    }
    if transformers.__version__.startswith("4."):
        from transformers import LlamaTokenizer

        loaders["llama_slow"] = lambda: LlamaTokenizer.from_pretrained(directory)
    reply = {"version": transformers.__version__, "modes": {}, "logits": None}
    for mode, load in loaders.items():
        try:
            reply["modes"][mode] = probe(load(), texts, chat)
        except Exception as error:  # reported to the test, which decides
            reply["modes"][mode] = {"error": f"{type(error).__name__}: {error}"}
    if request.get("logits_ids") is not None:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=False,
                                                     torch_dtype=torch.float32)
        model.eval()
        with torch.no_grad():
            ids = torch.tensor(request["logits_ids"], dtype=torch.long)
            reply["logits"] = model(ids).logits.tolist()
        reply["model_class"] = type(model).__name__
    json.dump(reply, sys.stdout)


if __name__ == "__main__":
    main()
