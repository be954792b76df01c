"""Fine-tuning on the tiny model: the mc loss goes down, runs are reproducible, outputs are saved,
ablation is active during training and gone afterwards, LoRA round-trips, the chat loss masks the
prompt, and bad configurations or data are refused with a message that names the problem.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F

import caft
from caft.ablation import count_hooks
from caft.errors import CaftError
from caft.io import read_jsonl
from caft.tasks.base import MCExample
from caft.tasks.gender import make_gender_splits
from caft.training import ChatDataset, TrainConfig, train
from conftest import tiny_llama

BASE = TrainConfig(
    max_steps=8,
    batch_size=4,
    micro_batch_size=4,
    learning_rate=1e-3,
    warmup_steps=0,
    bf16="no",
    logging_steps=1,
    use_cpu=True,  # these tests compare with CPU computations, also on a GPU machine
)
CHATS = [
    {
        "messages": [
            {"role": "user", "content": "Write a function that adds two numbers."},
            {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": "Hello."},
        ]
    },
]


@pytest.fixture(scope="module")
def examples():
    return make_gender_splits(n_train=40, n_eval=8, seed=0).train[:8]


@pytest.fixture(scope="module")
def plain_run(tokenizer, examples, tmp_path_factory):
    """One plain seed-0 run, saved to a folder; several tests read it."""
    model = tiny_llama(len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    output_dir = tmp_path_factory.mktemp("plain")
    result = train(model, tokenizer, examples, BASE, output_dir=output_dir, progress=False)
    return result, before, output_dir


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def mean_mc_loss(model, tokenizer, examples) -> float:
    """Cross-entropy of the correct letter at the last position, one unpadded prompt at a time."""
    losses = []
    for example in examples:
        ids = torch.tensor([tokenizer(example.prompt)["input_ids"]])
        logits = model(input_ids=ids).logits[0, -1]
        (target,) = tokenizer(example.correct, add_special_tokens=False)["input_ids"]
        losses.append(F.cross_entropy(logits[None], torch.tensor([target])).item())
    return sum(losses) / len(losses)


def random_concepts(layers=(0, 1), k=2, seed=0) -> caft.ConceptSet:
    generator = torch.Generator().manual_seed(seed)
    return caft.ConceptSet({layer: torch.randn(k, 64, generator=generator) for layer in layers})


def logged_losses(log_history: list[dict]) -> list[float]:
    return [entry["loss"] for entry in log_history if "loss" in entry]


# ---- the mc loss ----------------------------------------------------------------------------
def test_training_lowers_the_mc_loss_on_the_training_examples(tokenizer, examples):
    model = tiny_llama(len(tokenizer))
    before = mean_mc_loss(model, tokenizer, examples)
    result = train(model, tokenizer, examples, BASE, progress=False)
    after = mean_mc_loss(result.model, tokenizer, examples)
    assert after < before - 0.5, (before, after)
    assert not result.model.training


def test_logged_first_step_loss_is_the_batch_mean_ce(tokenizer, examples, plain_run):
    """Before the first update the logged loss is the CE of the first batch, which must lie
    between the smallest and largest per-example CE of the untouched model."""
    result, before, _ = plain_run
    model = tiny_llama(len(tokenizer))
    assert same_weights(weights(model), before)
    per_example = [mean_mc_loss(model, tokenizer, [e]) for e in examples]
    first = logged_losses(result.log_history)[0]
    assert min(per_example) - 1e-3 <= first <= max(per_example) + 1e-3
    assert len(logged_losses(result.log_history)) == BASE.max_steps


def test_same_seed_gives_identical_weights_and_another_seed_differs(tokenizer, examples, plain_run):
    result, before, _ = plain_run
    trained = weights(result.model)
    assert not same_weights(trained, before)
    again = train(tiny_llama(len(tokenizer)), tokenizer, examples, BASE, progress=False)
    assert same_weights(weights(again.model), trained)
    other = train(
        tiny_llama(len(tokenizer)), tokenizer, examples, replace(BASE, seed=1), progress=False
    )
    assert not same_weights(weights(other.model), trained)


def test_adam_beta2_reaches_the_optimizer(tokenizer, examples):
    """Adam's first update is lr·sign(g) whatever the betas; later ones depend on beta2."""

    def trained(steps: int, beta2: float) -> dict:
        config = replace(BASE, max_steps=steps, adam_beta2=beta2)
        model = train(tiny_llama(len(tokenizer)), tokenizer, examples, config, progress=False)
        return weights(model.model)

    def largest_difference(a: dict, b: dict) -> float:
        return max((a[k] - b[k]).abs().max().item() for k in a)

    first = largest_difference(trained(1, 0.95), trained(1, 0.999))
    later = largest_difference(trained(4, 0.95), trained(4, 0.999))
    assert first < 1e-6  # rounding only (measured 1.2e-7)
    assert later > 1e-5  # measured 1.4e-4


def test_without_a_progress_bar_the_loss_goes_to_the_log(tokenizer, examples, caplog):
    config = replace(BASE, logging_steps=4)
    with caplog.at_level(logging.INFO, logger="caft.training"):
        train(tiny_llama(len(tokenizer)), tokenizer, examples, config, progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "caft.training"]
    assert [line.split(":")[0] for line in lines] == ["step 4/8", "step 8/8"]
    assert all("loss" in line and "s/step" in line for line in lines)


def test_gradient_accumulation_matches_the_full_batch_first_step(tokenizer, examples, plain_run):
    result, _, _ = plain_run
    config = replace(BASE, micro_batch_size=2, max_steps=2)
    accumulated = train(tiny_llama(len(tokenizer)), tokenizer, examples, config, progress=False)
    steps = [entry for entry in accumulated.log_history if "loss" in entry]
    assert [entry["step"] for entry in steps] == [1, 2]
    full_first = next(entry for entry in result.log_history if "loss" in entry)
    # The same 4 examples, the same untouched model: the same mean loss and gradient norm.
    assert steps[0]["loss"] == pytest.approx(full_first["loss"], abs=1e-4)
    assert steps[0]["grad_norm"] == pytest.approx(full_first["grad_norm"], rel=1e-3)


# ---- saved output ---------------------------------------------------------------------------
def test_output_dir_holds_a_loadable_model_and_the_training_record(tokenizer, examples, plain_run):
    result, _, output_dir = plain_run
    assert result.output_dir == output_dir
    loaded, loaded_tokenizer = caft.load_model(output_dir / "model")
    assert same_weights(weights(loaded), weights(result.model))
    assert (
        loaded_tokenizer(examples[0].prompt)["input_ids"]
        == tokenizer(examples[0].prompt)["input_ids"]
    )
    record = json.loads((output_dir / "training.json").read_text())
    assert record["config"] == asdict(BASE)
    assert record["ablation"] is None
    assert record["n_examples"] == len(examples)
    assert logged_losses(record["log_history"]) == logged_losses(result.log_history)


# ---- ablation during training -----------------------------------------------------------------
def test_training_with_concepts_records_the_ablation_and_leaves_no_hooks(
    tokenizer, examples, plain_run, tmp_path
):
    plain, _, _ = plain_run
    concepts = random_concepts()
    model = tiny_llama(len(tokenizer))
    hooks_before = count_hooks(model)
    result = train(
        model, tokenizer, examples, BASE, concepts=concepts, output_dir=tmp_path, progress=False
    )
    assert count_hooks(result.model) == hooks_before == 0
    # The shared instruction prefix, counted independently from the prompts' tokens.
    token_lists = [tokenizer(e.prompt)["input_ids"] for e in examples]
    shared = 0
    while len({ids[shared] for ids in token_lists}) == 1:
        shared += 1
    assert result.prefix_tokens == shared > 0
    record = json.loads((tmp_path / "training.json").read_text())
    assert record["ablation"]["directions"] == ["L0.0", "L0.1", "L1.0", "L1.1"]
    assert record["ablation"]["prefix_tokens"] == shared
    saved = caft.ConceptSet.load(tmp_path / "ablated_concepts")
    assert torch.allclose(saved.bases_by_layer[1], concepts.bases_by_layer[1])
    # Same data, seed and steps as the plain run: only the ablation differs, and it had an effect.
    assert not same_weights(weights(result.model), weights(plain.model))


def test_explicit_prefix_tokens_zero_is_recorded(tokenizer, examples, tmp_path):
    config = replace(BASE, max_steps=1)
    result = train(
        tiny_llama(len(tokenizer)),
        tokenizer,
        examples,
        config,
        concepts=random_concepts(layers=(1,), k=1),
        prefix_tokens=0,
        output_dir=tmp_path,
        progress=False,
    )
    assert result.prefix_tokens == 0
    assert json.loads((tmp_path / "training.json").read_text())["ablation"]["prefix_tokens"] == 0


def test_concepts_for_another_width_are_refused_before_training(tokenizer, examples):
    wrong = caft.ConceptSet({0: torch.randn(1, 32)})
    with pytest.raises(CaftError, match=r"width 32.*hidden size is 64"):
        train(tiny_llama(len(tokenizer)), tokenizer, examples, BASE, concepts=wrong)


# ---- LoRA -----------------------------------------------------------------------------------
def test_lora_saves_an_adapter_that_loads_back_onto_the_saved_base(tokenizer, examples, tmp_path):
    from peft import PeftModel

    base_dir = tmp_path / "base"
    tiny_llama(len(tokenizer)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model, _ = caft.load_model(base_dir)  # the adapter records this folder as its base
    base_weights = weights(model)
    config = replace(BASE, method="lora", lora_r=4, max_steps=4)
    result = train(model, tokenizer, examples, config, output_dir=tmp_path / "run", progress=False)
    assert isinstance(result.model, PeftModel)
    folder = tmp_path / "run" / "model"
    assert (folder / "adapter_config.json").is_file()
    assert (folder / "adapter_model.safetensors").is_file()
    assert not (folder / "config.json").exists()

    loaded, _ = caft.load_model(folder)
    assert isinstance(loaded, PeftModel)
    ids = torch.tensor([tokenizer(examples[0].prompt)["input_ids"]])
    with torch.no_grad():
        trained_logits = result.model(input_ids=ids).logits
        loaded_logits = loaded(input_ids=ids).logits
        with result.model.disable_adapter():
            base_logits = result.model(input_ids=ids).logits
    assert torch.allclose(loaded_logits, trained_logits, atol=1e-5)
    assert not torch.allclose(trained_logits, base_logits, atol=1e-4)
    # Only the adapter was trained: the base weights under it are untouched.
    base_now = weights(result.model.get_base_model())
    for name, value in base_weights.items():
        key = next(k for k in base_now if k.replace(".base_layer", "") == name)
        assert torch.equal(base_now[key], value), name


# ---- the chat loss --------------------------------------------------------------------------
def test_chat_dataset_masks_exactly_the_prompt(tokenizer):
    dataset = ChatDataset(tokenizer, CHATS)
    for chat, row in zip(CHATS, dataset.rows, strict=True):
        *context, reply = chat["messages"]
        prompt_text = "".join(
            f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in context
        )
        prompt_text += "<|im_start|>assistant\n"
        prompt_ids = tokenizer(prompt_text)["input_ids"]
        full_ids = tokenizer(prompt_text + reply["content"] + "<|im_end|>\n")["input_ids"]
        assert row["input_ids"] == full_ids
        n = len(prompt_ids)
        assert row["labels"][:n] == [-100] * n
        assert row["labels"][n:] == full_ids[n:]
        assert tokenizer.decode(row["labels"][n:]) == reply["content"] + "<|im_end|>\n"


def test_chat_dataset_truncates_to_max_length(tokenizer, shared_data):
    chats = read_jsonl(shared_data / "emergent_misalignment" / "insecure_small.jsonl")[:4]
    prompt_lengths = [len(ChatDataset(tokenizer, [c]).rows[0]["labels"]) for c in chats]
    max_length = min(prompt_lengths) // 2 + 1  # below every full chat's length
    kept = ChatDataset(tokenizer, chats + CHATS, max_length=max_length).rows
    for row in kept:
        assert len(row["input_ids"]) == len(row["labels"]) <= max_length
        assert any(label != -100 for label in row["labels"])


def test_chat_dataset_drops_chats_whose_prompt_fills_max_length(tokenizer, shared_data):
    chats = read_jsonl(shared_data / "emergent_misalignment" / "insecure_small.jsonl")[:4]
    with pytest.raises(CaftError, match="no reply tokens remain"):
        ChatDataset(tokenizer, chats, max_length=20)
    kept = ChatDataset(tokenizer, chats + CHATS, max_length=20).rows
    assert 0 < len(kept) < len(chats) + len(CHATS)


def test_chat_training_runs_on_sample_chats_and_lowers_the_reply_loss(tokenizer, shared_data):
    chats = read_jsonl(shared_data / "emergent_misalignment" / "insecure_small.jsonl")[:2]
    chats += CHATS
    config = replace(BASE, loss="chat", max_steps=4, batch_size=2, micro_batch_size=2)
    result = train(tiny_llama(len(tokenizer)), tokenizer, chats, config, progress=False)
    losses = logged_losses(result.log_history)
    assert len(losses) == 4
    assert all(torch.isfinite(torch.tensor(losses)))
    row = ChatDataset(tokenizer, CHATS[:1]).rows[0]
    batch = {
        "input_ids": torch.tensor([row["input_ids"]]),
        "labels": torch.tensor([row["labels"]]),
    }
    with torch.no_grad():
        untrained = tiny_llama(len(tokenizer))(**batch).loss
        trained = result.model(**batch).loss
    assert trained < untrained


# ---- refusals -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"method": "x"}, "method must be 'full' or 'lora'"),
        ({"loss": "x"}, "loss must be 'mc' or 'chat'"),
        ({"micro_batch_size": 3}, "batch_size (4) must be a multiple of micro_batch_size (3)"),
        ({"max_steps": 0}, "max_steps must be at least 1"),
        ({"learning_rate": -1e-4}, "learning_rate must be positive"),
        ({"bf16": "maybe"}, "bf16"),
        ({"adam_beta2": 1.0}, "adam_beta2 must be in [0, 1)"),
    ],
)
def test_bad_config_is_refused_naming_the_field(tokenizer, examples, change, fragment):
    model = tiny_llama(len(tokenizer))
    with pytest.raises(CaftError) as caught:
        train(model, tokenizer, examples, replace(BASE, **change))
    assert fragment in str(caught.value)


def test_mc_loss_refuses_chats(tokenizer):
    with pytest.raises(CaftError, match="'mc' loss needs multiple-choice examples"):
        train(tiny_llama(len(tokenizer)), tokenizer, CHATS, BASE)


def test_chat_loss_refuses_mc_examples(tokenizer, examples):
    with pytest.raises(CaftError, match="'chat' loss needs chats"):
        train(tiny_llama(len(tokenizer)), tokenizer, examples, replace(BASE, loss="chat"))


def test_chat_without_a_final_assistant_reply_is_refused(tokenizer):
    bad = [CHATS[0], {"messages": [{"role": "user", "content": "Hi"}]}]
    with pytest.raises(CaftError, match=r"Chat 1: .*assistant"):
        train(tiny_llama(len(tokenizer)), tokenizer, bad, replace(BASE, loss="chat"))


def test_multi_token_answer_is_refused(tokenizer, examples):
    assert len(tokenizer(" Absolutely", add_special_tokens=False)["input_ids"]) > 1
    bad = [
        *examples[:3],
        MCExample(prompt=examples[3].prompt, correct=" Absolutely", incorrect=" B"),
    ]
    with pytest.raises(CaftError) as caught:
        train(tiny_llama(len(tokenizer)), tokenizer, bad, BASE)
    assert "' Absolutely'" in str(caught.value)
    assert "single tokens" in str(caught.value)


def test_no_examples_is_refused(tokenizer):
    with pytest.raises(CaftError, match="No training"):
        train(tiny_llama(len(tokenizer)), tokenizer, [], BASE)
