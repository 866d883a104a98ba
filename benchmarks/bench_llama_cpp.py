"""GGUF files written by ``modelport convert`` run in llama.cpp itself (llama-cpp-python).

Tiny random models built with transformers (Llama with its own ``lm_head``, Llama with tied
embeddings, GPT-2; hidden 64, 2 layers, initializer range 0.2 so attention is far from
uniform and a wrong q/k layout shows) and a byte-level BPE tokenizer trained with the
``tokenizers`` library on a few sentences (saved as ``tokenizer.json``, so each file gets a
vocabulary) are converted with ``modelport convert DIR model.gguf --gguf-type T`` for f32, f16,
q8_0 and q4_0. llama.cpp then loads each file (``Llama(model_path, logits_all=True,
n_ctx=64)``), evaluates a fixed token sequence and generates 8 tokens greedily (argmax of its
own logits, fed back), in a separate venv. transformers does the same on the source model.

Columns: model, type, whether llama.cpp loads the file (else its error), the logit error
against the source model (max abs difference over every position, as a share of the
largest source logit; the KV cache is float32, so an f32 Llama matches to rounding, while
GPT-2 keeps ~5e-4 from ggml's GELU, which reads a float16 table), the same against
transformers running the GGUF file itself (``from_pretrained(gguf_file=...)`` dequantizes it
with gguf-py: what is left is llama.cpp's own arithmetic, which also rounds activations to 8
bits for quantized matrices, not the file; so a large first error with a small second one is
the quantization of these wide random weights), the 8 generated ids from llama.cpp and from
the source model and whether they are equal, and whether llama.cpp's tokenizer splits a
sentence (digits, ``$``, ``!!``) into the ids the tokenizers library gives, which depends on
``tokenizer.ggml.pre``, and whether llama.cpp adds the BOS (``add_bos_token`` of
tokenizer_config.json) and reads the chat template back.

llama-cpp-python compiles llama.cpp from source (no wheel for this platform on PyPI), so it
lives in its own venv, ``--venv`` (default /tmp/llama-venv); when that venv cannot import
``llama_cpp`` this script builds it, CPU only::

    python3 -m venv /tmp/llama-venv
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \\
        /tmp/llama-venv/bin/pip install llama-cpp-python

(measured: 32 minutes for llama-cpp-python 0.3.36, 193 compile steps, on 2 cores shared
with other work; ``-DLLAVA_BUILD=OFF`` would skip its multimodal library, about a quarter of
the steps, which this benchmark does not use).

Usage: .venv/bin/python benchmarks/bench_llama_cpp.py [--venv DIR] [--types f32,f16,q8_0,q4_0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CMAKE_ARGS = "-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
TYPES = ("f32", "f16", "q8_0", "q4_0")
PROMPT_LENGTH = 12
GENERATED = 8
N_CTX = 64
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A tiny model writes a tiny file, and llama.cpp reads it back.",
    "Weights, names and a vocabulary: what a GGUF file needs to run.",
    "Numbers like 3, 33 and 333 are split as the tokenizer says.",
    "Hello world! Hello GGUF. Hello llama.",
]
CHECK_SENTENCE = "Hello world !! The lazy fox paid $333333 for 3333 GGUF files."
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"

# runs inside the llama-cpp-python venv: argv[1] is a JSON request, stdout one JSON answer
LLAMA_CPP_RUNNER = r"""
import json, sys
import numpy as np
from llama_cpp import Llama

request = json.loads(sys.argv[1])
llm = Llama(model_path=request["path"], logits_all=True, n_ctx=request["n_ctx"],
            n_threads=2, verbose=False, seed=0, type_k=0, type_v=0)  # GGML_TYPE_F32
tokens = request["tokens"]
llm.eval(tokens)
logits = np.array(llm.scores[: len(tokens)], dtype=np.float64)
generated = []
for _ in range(request["generate"]):
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    generated.append(token)
    llm.eval([token])
split = llm.tokenize(request["text"].encode(), add_bos=False, special=False)
first = llm.tokenize(b"Hello", add_bos=True)[0]  # add_bos=True: BOS if the file asks for it
template = llm.metadata.get("tokenizer.chat_template")
print(json.dumps({"logits": logits.tolist(), "generated": generated, "split": split,
                  "first": first, "template": template}))
"""


def llama_venv(venv: Path) -> Path:
    """The venv's python, after building llama-cpp-python into it when it is missing."""
    python = venv / "bin" / "python"
    if python.exists() and _imports_llama_cpp(python):
        return python
    print(f"building llama-cpp-python into {venv} (compiles llama.cpp; minutes)", flush=True)
    start = time.perf_counter()
    if not python.exists():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS}
    subprocess.run(
        [str(python), "-m", "pip", "install", "llama-cpp-python", "numpy"], check=True, env=env
    )
    print(f"built in {time.perf_counter() - start:.0f} s", flush=True)
    return python


def _imports_llama_cpp(python: Path) -> bool:
    found = subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True)
    return found.returncode == 0


def train_tokenizer(folder: Path) -> int:
    """A byte-level BPE trained on ``SENTENCES``, saved as tokenizer.json, with a
    tokenizer_config.json (BOS added, a chat template); its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    settings = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    settings["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return int(tokenizer.get_vocab_size())


def _padded(size: int) -> int:
    """The embedding rows for a tokenizer of ``size``: a multiple of 32 (quantized rows of
    the output matrix), leaving a few ids the tokenizer does not use."""
    return (size + 31) // 32 * 32 + 32


def llama(vocab: int, tied: bool) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=1,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config)


def gpt2(vocab: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=1024,  # transformers' GGUF loader ignores gpt2.context_length
        vocab_size=vocab,
        bos_token_id=0,
        eos_token_id=1,
        initializer_range=0.2,
    )
    return GPT2LMHeadModel(config)


MODELS: dict[str, Callable[[int], Any]] = {
    "llama": lambda vocab: llama(vocab, tied=False),
    "llama-tied": lambda vocab: llama(vocab, tied=True),
    "gpt2": gpt2,
}


def build(name: str, root: Path) -> tuple[Path, Any, list[int], list[int]]:
    """The folder, the model, the prompt ids and the check sentence's ids."""
    import torch
    from tokenizers import Tokenizer

    folder = root / name
    folder.mkdir(parents=True)
    size = train_tokenizer(folder)
    torch.manual_seed(0)
    model = MODELS[name](_padded(size)).eval()
    model.save_pretrained(folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompt = tokenizer.encode(SENTENCES[0] + " " + SENTENCES[1]).ids[:PROMPT_LENGTH]
    return folder, model, prompt, tokenizer.encode(CHECK_SENTENCE).ids


def transformers_run(model: Any, prompt: list[int]) -> tuple[Any, list[int]]:
    """Logits at every prompt position, and ``GENERATED`` greedy ids (argmax fed back)."""
    import torch

    ids = list(prompt)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double().numpy()
        for _ in range(GENERATED):
            step = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(torch.argmax(step)))
    return logits, ids[len(prompt) :]


def convert(folder: Path, gguf_type: str, target: Path) -> str:
    """modelport's CLI, as a user runs it; its error text when it fails."""
    command = [sys.executable, "-m", "modelport", "convert", str(folder), str(target)]
    done = subprocess.run(
        [*command, "--gguf-type", gguf_type, "--overwrite"],
        capture_output=True,
        text=True,
    )
    return "" if done.returncode == 0 else (done.stderr or done.stdout).strip()[-300:]


def llama_cpp_run(python: Path, path: Path, prompt: list[int]) -> dict[str, Any]:
    request = {
        "path": str(path),
        "tokens": prompt,
        "n_ctx": N_CTX,
        "generate": GENERATED,
        "text": CHECK_SENTENCE,
    }
    done = subprocess.run(
        [str(python), "-c", LLAMA_CPP_RUNNER, json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return {"error": " | ".join(lines[-3:])[-300:]}
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


HEADER = (
    "model",
    "type",
    "loads",
    "err vs source",
    "err vs GGUF in transformers",
    "llama.cpp ids",
    "transformers ids",
    "equal",
    "same split",
    "BOS, template",
)


def gguf_in_transformers(path: Path, prompt: list[int]) -> Any:
    """transformers' logits for the GGUF file itself (dequantized by gguf-py)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].double().numpy()


def measure(name: str, root: Path, python: Path, types: list[str]) -> list[tuple[str, ...]]:
    """One row per GGUF type for the model ``name``; splits that differ are printed."""
    import numpy as np

    folder, model, prompt, split = build(name, root)
    expected, hf_generated = transformers_run(model, prompt)
    scale = float(np.abs(expected).max())
    rows = []
    for gguf_type in types:
        target = root / f"{name}-{gguf_type}.gguf"
        failed = convert(folder, gguf_type, target)
        got = {"error": f"convert: {failed}"} if failed else llama_cpp_run(python, target, prompt)
        if "error" in got:
            rows.append((name, gguf_type, "error", got["error"], "", "", "", "", "", ""))
            continue
        logits = np.array(got["logits"])
        error = float(np.abs(logits - expected).max()) / scale
        dequantized = gguf_in_transformers(target, prompt)
        runtime_error = float(np.abs(logits - dequantized).max()) / scale
        if got["split"] != split:
            print(f"{name} {gguf_type}: llama.cpp splits {got['split']}, tokenizers {split}")
        rows.append(
            (
                name,
                gguf_type,
                "yes",
                f"{error:.1e}",
                f"{runtime_error:.1e}",
                " ".join(map(str, got["generated"])),
                " ".join(map(str, hf_generated)),
                "yes" if got["generated"] == hf_generated else "no",
                "yes" if got["split"] == split else "no",
                "yes" if (got["first"], got["template"]) == (0, CHAT_TEMPLATE) else "no",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=Path("/tmp/llama-venv"))
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    python = llama_venv(args.venv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-llama-cpp-") as tmp:
        for name in args.models.split(","):
            rows += measure(name, Path(tmp), python, args.types.split(","))
    _table(HEADER, rows)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        cells = (str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


if __name__ == "__main__":
    main()
