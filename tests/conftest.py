"""Shared fixtures: a tokenizer trained here on the task's own text, and tiny random models.

Nothing is downloaded. The tokenizer is a byte-level BPE trained in a second on gender-task prompts
and chat text, with ChatML special tokens and a chat template, so every code path (MC prompts,
answer letters, chats) runs exactly as with a real model.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# A small corpus for window/display tests: pronouns, prompt fragments, code, markup.
WINDOW_DOCS = [
    "The teacher said he would grade the tests on Monday.",
    "Answer: A",
    "The nurse told him that she was busy.",
    "def add(a, b):\n    return a + b",
    "Choose the option corresponding to the correct pronoun.",
    "The engineer fixed the bridge because she knew how.",
    "<b>bold</b> & more",
    "Question: The pilot said _____ was tired.",
    "The chef cooked dinner for her family and him.",
    "Answer: B",
]
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _training_text() -> list[str]:
    from caft.tasks.gender import load_professions, load_templates, make_gender_splits

    splits = make_gender_splits(load_templates(), load_professions(), n_train=400, n_eval=40)
    prompts = [e.prompt + e.correct for e in splits.train]
    prompts += [e.prompt + e.incorrect for e in splits.eval_sets["ood"]]
    chats = [
        "<|im_start|>user\nWrite a function that adds two numbers.<|im_end|>\n"
        "<|im_start|>assistant\ndef add(a, b):\n    return a + b<|im_end|>\n"
    ] * 20
    return prompts + chats + ["Answer: A", "Answer: B"] * 50


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from caft.models import prepare_tokenizer

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_training_text(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    prepare_tokenizer(fast)
    return fast


def tiny_llama(vocab_size: int, *, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def model(tokenizer):
    """A fresh tiny Llama (2 layers, width 64) matching the test tokenizer."""
    return tiny_llama(len(tokenizer))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not available")
    return SHARED_DATA
