"""Concept ablation hooks: `h ← h − scale·(hQ)Qᵀ` at chosen decoder layers, only inside `ablate`.

What is proved here, on tiny random models: the hooked layers' outputs (and the gradients flowing
back through them) have no component along the concept directions; layers before them are
untouched; nothing is left behind on exit, whether the block ends normally, by an exception or after
many repetitions; the same holds through PEFT, under gradient checkpointing, for tuple-returning
blocks and bf16 weights; `prefix_tokens` spares exactly the first real tokens of each left-padded
row; and the Trainer callback registers and removes the same hooks.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from caft.ablation import (
    AblationCallback,
    ablate,
    common_prefix_length,
    count_hooks,
    project_out,
)
from caft.activations import capture_layer_outputs
from caft.batching import pad_left
from caft.concepts import ConceptSet
from caft.errors import CaftError
from caft.models import find_decoder_layers
from conftest import tiny_llama

WIDTH = 64
PROMPTS = ("The nurse said that she would", "He told the engineer about")


def _concepts(layers, *, k: int = 3, width: int = WIDTH, seed: int = 0) -> ConceptSet:
    generator = torch.Generator().manual_seed(seed)
    return ConceptSet({layer: torch.randn(k, width, generator=generator) for layer in layers})


def _batch(tokenizer, prompts=PROMPTS) -> dict[str, torch.Tensor]:
    return pad_left([tokenizer(p)["input_ids"] for p in prompts], tokenizer.pad_token_id)


def _labels(batch) -> torch.Tensor:
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def _run(model, batch, layers) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Layer outputs (as the next layer sees them) and logits of a no-grad forward."""
    with torch.no_grad(), capture_layer_outputs(model, layers) as store:
        logits = model(**batch).logits
    return dict(store), logits


def _relative_component(hidden: torch.Tensor, basis: torch.Tensor) -> float:
    """Largest |h·q| over positions and directions, relative to the largest |h|."""
    hidden = hidden.float()
    return ((hidden @ basis.T).abs().max() / hidden.norm(dim=-1).max()).item()


# ---- the projection inside the context ---------------------------------------------------------


def test_hooked_layer_outputs_have_no_component_along_the_concepts(tokenizer, model):
    concepts = _concepts([0, 1])
    batch = _batch(tokenizer)
    before, _ = _run(model, batch, [0, 1])
    with ablate(model, concepts):
        inside, _ = _run(model, batch, [0, 1])
    for layer in (0, 1):
        basis = concepts.bases_by_layer[layer]
        assert _relative_component(before[layer], basis) > 1e-2  # there was something to remove
        assert _relative_component(inside[layer], basis) < 1e-5


def test_only_hooked_layers_are_projected_and_earlier_layers_are_unchanged(tokenizer):
    model = tiny_llama(len(tokenizer), layers=3)
    concepts = _concepts([1])
    basis = concepts.bases_by_layer[1]
    batch = _batch(tokenizer)
    before, _ = _run(model, batch, [0, 1, 2])
    with ablate(model, concepts):
        inside, _ = _run(model, batch, [0, 1, 2])
    assert torch.equal(inside[0], before[0])
    torch.testing.assert_close(inside[1], project_out(before[1], basis), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(inside[2], before[2], atol=1e-3)  # later layers see the change


def test_gradients_along_the_concepts_vanish_at_the_hooked_layer(tokenizer, model):
    concepts = _concepts([0])
    basis = concepts.bases_by_layer[0]
    batch = _batch(tokenizer)
    kept = {}

    def keep_pre_ablation_output(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden.retain_grad()
        kept["hidden"] = hidden

    # Registered before `ablate`, so it runs before the projection and sees its input.
    handle = find_decoder_layers(model)[0].register_forward_hook(keep_pre_ablation_output)
    try:
        model(**batch, labels=_labels(batch)).loss.backward()
        plain = kept["hidden"].grad.clone()
        model.zero_grad()
        with ablate(model, concepts):
            model(**batch, labels=_labels(batch)).loss.backward()
        ablated = kept["hidden"].grad
    finally:
        handle.remove()
    assert _relative_component(plain, basis) > 1e-3  # without ablation the gradient has it
    assert _relative_component(ablated, basis) < 1e-5
    hooked_layer_grad = find_decoder_layers(model)[0].mlp.down_proj.weight.grad
    assert hooked_layer_grad.abs().sum() > 0  # nothing is detached: the hooked layer still learns


# ---- nothing outside the context ---------------------------------------------------------------


def test_logits_and_hook_count_are_restored_after_the_context(tokenizer, model):
    concepts = _concepts([0, 1])
    batch = _batch(tokenizer)
    initial_hooks = count_hooks(model)
    _, logits_before = _run(model, batch, [])
    with ablate(model, concepts) as ablation:
        assert ablation.active
        assert count_hooks(model) == initial_hooks + 2
        _, logits_inside = _run(model, batch, [])
    _, logits_after = _run(model, batch, [])
    assert not ablation.active
    assert count_hooks(model) == initial_hooks
    assert not torch.allclose(logits_inside, logits_before, atol=1e-3)
    assert torch.equal(logits_after, logits_before)


def test_hooks_go_only_on_the_concept_layers(tokenizer):
    model = tiny_llama(len(tokenizer), layers=3)
    layers = find_decoder_layers(model)
    with ablate(model, _concepts([0, 2])):
        assert [len(layer._forward_hooks) for layer in layers] == [1, 0, 1]
    assert [len(layer._forward_hooks) for layer in layers] == [0, 0, 0]


def test_fifty_enter_exit_cycles_leak_no_hooks(model):
    concepts = _concepts([0, 1])
    initial_hooks = count_hooks(model)
    reused = ablate(model, concepts, prefix_tokens=2)
    for _ in range(50):
        with ablate(model, concepts, prefix_tokens=2):
            assert count_hooks(model) == initial_hooks + 3  # two layers + the position recorder
        with reused:
            assert count_hooks(model) == initial_hooks + 3
    assert count_hooks(model) == initial_hooks


def test_an_active_ablation_cannot_be_entered_again(model):
    initial_hooks = count_hooks(model)
    ablation = ablate(model, _concepts([0]))
    with ablation:
        with pytest.raises(CaftError, match="already active"):
            ablation.__enter__()
        assert count_hooks(model) == initial_hooks + 1
    assert count_hooks(model) == initial_hooks


def test_an_exception_inside_the_block_removes_every_hook(tokenizer, model):
    batch = _batch(tokenizer)
    _, logits_before = _run(model, batch, [])
    initial_hooks = count_hooks(model)
    ablation = ablate(model, _concepts([0, 1]), prefix_tokens=1)
    with pytest.raises(RuntimeError, match="training blew up"), ablation:
        model(**batch)
        raise RuntimeError("training blew up")
    assert count_hooks(model) == initial_hooks
    assert torch.equal(_run(model, batch, [])[1], logits_before)


# ---- wrappers, checkpointing, block outputs, dtypes --------------------------------------------


def test_ablation_through_a_peft_lora_model_hooks_the_base_layers(tokenizer, model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config).eval()
    base_layers = peft_model.get_base_model().model.layers
    concepts = _concepts([1])
    batch = _batch(tokenizer)
    initial_hooks = count_hooks(peft_model)
    _, logits_before = _run(peft_model, batch, [])
    with ablate(peft_model, concepts):
        assert len(base_layers[1]._forward_hooks) == 1
        inside, logits_inside = _run(peft_model, batch, [1])
    assert _relative_component(inside[1], concepts.bases_by_layer[1]) < 1e-5
    assert not torch.allclose(logits_inside, logits_before, atol=1e-3)
    assert torch.equal(_run(peft_model, batch, [])[1], logits_before)
    assert count_hooks(peft_model) == initial_hooks


def _loss_and_grads(model, batch, concepts):
    model.train()
    with ablate(model, concepts, prefix_tokens=2):
        loss = model(**batch, labels=_labels(batch), use_cache=False).loss
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_gradient_checkpointing_gives_the_same_loss_and_grads_under_ablation(tokenizer):
    concepts = _concepts([0, 1])
    batch = _batch(tokenizer)
    plain = tiny_llama(len(tokenizer), seed=5)
    checkpointed = tiny_llama(len(tokenizer), seed=5)
    checkpointed.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    assert all(layer.gradient_checkpointing for layer in find_decoder_layers(checkpointed))
    assert not any(layer.gradient_checkpointing for layer in find_decoder_layers(plain))

    loss, grads = _loss_and_grads(plain, batch, concepts)
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed, batch, concepts)
    unablated = plain(**batch, labels=_labels(batch), use_cache=False).loss.detach()
    assert not torch.allclose(loss, unablated)  # the ablation is in effect
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_gpt2_blocks_are_projected(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=WIDTH, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    concepts = _concepts([0, 1])
    batch = _batch(tokenizer)
    _, logits_before = _run(model, batch, [])
    with ablate(model, concepts):
        inside, logits_inside = _run(model, batch, [0, 1])
    for layer in (0, 1):
        assert _relative_component(inside[layer], concepts.bases_by_layer[layer]) < 1e-5
    assert not torch.allclose(logits_inside, logits_before, atol=1e-3)
    assert torch.equal(_run(model, batch, [])[1], logits_before)


class _TupleBlock(nn.Module):
    """A residual block returning (hidden, extra), like older transformers decoder layers."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)

    def forward(self, hidden):
        update = torch.tanh(self.linear(hidden))
        return hidden + update, update.sum(-1)


class _TupleLM(nn.Module):
    def __init__(self, vocab: int = 50):
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(hidden_size=WIDTH, num_hidden_layers=2)
        self.model = nn.Module()
        self.model.embed = nn.Embedding(vocab, WIDTH)
        self.model.layers = nn.ModuleList([_TupleBlock(), _TupleBlock()])
        self.head = nn.Linear(WIDTH, vocab)

    def forward(self, input_ids, attention_mask=None):
        hidden, extras = self.model.embed(input_ids), []
        for block in self.model.layers:
            hidden, extra = block(hidden)
            extras.append(extra)
        return SimpleNamespace(logits=self.head(hidden), extras=extras)


def test_tuple_returning_blocks_are_projected_and_keep_their_other_outputs():
    model = _TupleLM()
    concepts = _concepts([0])
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])}
    with torch.no_grad():
        plain = model(**batch)
    with torch.no_grad(), ablate(model, concepts), capture_layer_outputs(model, [0]) as store:
        ablated = model(**batch)
    assert _relative_component(store[0], concepts.bases_by_layer[0]) < 1e-5
    assert torch.equal(ablated.extras[0], plain.extras[0])  # the rest of the tuple passes through
    assert not torch.allclose(ablated.logits, plain.logits, atol=1e-4)


def test_bf16_model_keeps_its_dtype_and_loses_most_of_the_component(tokenizer):
    model = tiny_llama(len(tokenizer)).to(torch.bfloat16)
    concepts = _concepts([0, 1])
    batch = _batch(tokenizer)
    before, _ = _run(model, batch, [0, 1])
    with ablate(model, concepts):
        inside, logits = _run(model, batch, [0, 1])
    assert logits.dtype == torch.bfloat16
    for layer in (0, 1):
        basis = concepts.bases_by_layer[layer]
        assert inside[layer].dtype == torch.bfloat16
        remaining = _relative_component(inside[layer], basis)
        assert remaining < 5e-3  # bf16 rounding of the projected state, nothing more
        assert remaining < 0.05 * _relative_component(before[layer], basis)


# ---- prefix_tokens, scale ----------------------------------------------------------------------


def test_prefix_tokens_spares_the_first_real_tokens_of_each_left_padded_row(tokenizer, model):
    prefix = 3
    concepts = _concepts([0, 1])
    batch = _batch(tokenizer)
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(-1).tolist()
    assert lengths[0] != lengths[1] and min(lengths) > prefix + 1  # really padded, both rows

    before, _ = _run(model, batch, [0, 1])
    with ablate(model, concepts, prefix_tokens=prefix):
        inside, _ = _run(model, batch, [0, 1])
    width = batch["input_ids"].shape[1]
    for row, length in enumerate(lengths):
        first_real = width - length
        spared = slice(first_real, first_real + prefix)
        later = slice(first_real + prefix, width)
        assert torch.equal(inside[0][row, :first_real], before[0][row, :first_real])  # padding
        for layer in (0, 1):
            # Prefix positions attend only to the (untouched) prefix, so even layer 1 matches.
            torch.testing.assert_close(
                inside[layer][row, spared], before[layer][row, spared], atol=1e-6, rtol=0
            )
            basis = concepts.bases_by_layer[layer]
            assert _relative_component(before[layer][row, later], basis) > 1e-2
            assert _relative_component(inside[layer][row, later], basis) < 1e-5


def test_prefix_tokens_without_attention_mask_counts_absolute_positions(tokenizer, model):
    concepts = _concepts([0])
    ids = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
    before, _ = _run(model, {"input_ids": ids}, [0])
    with ablate(model, concepts, prefix_tokens=2):
        inside, _ = _run(model, {"input_ids": ids}, [0])
    assert torch.equal(inside[0][:, :2], before[0][:, :2])
    assert _relative_component(inside[0][:, 2:], concepts.bases_by_layer[0]) < 1e-5


def test_negative_prefix_tokens_is_rejected(model):
    with pytest.raises(CaftError, match="prefix_tokens must be >= 0, got -1"):
        ablate(model, _concepts([0]), prefix_tokens=-1)


@pytest.mark.parametrize(
    ("lists", "expected"),
    [
        ([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]], 2),
        ([[7, 8, 9], [7, 8, 9]], 3),
        ([[1, 2], [1, 2, 3]], 2),
        ([[1, 2], [3, 2]], 0),
        ([[4, 5, 6]], 3),
        ([[1, 2], []], 0),
        ([], 0),
    ],
)
def test_common_prefix_length(lists, expected):
    assert common_prefix_length(lists) == expected


def test_half_scale_removes_half_of_the_component(tokenizer, model):
    concepts = _concepts([0])
    basis = concepts.bases_by_layer[0]
    batch = _batch(tokenizer)
    before, _ = _run(model, batch, [0])
    with ablate(model, concepts, scale=0.5):
        inside, _ = _run(model, batch, [0])
    coefficients_before = before[0] @ basis.T
    torch.testing.assert_close(inside[0] @ basis.T, 0.5 * coefficients_before, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        project_out(inside[0], basis), project_out(before[0], basis), atol=1e-5, rtol=0
    )  # the orthogonal complement is untouched


# ---- Trainer callback, bad input ---------------------------------------------------------------


def test_callback_registers_hooks_on_train_begin_and_removes_them_on_train_end(tokenizer, model):
    concepts = _concepts([1])
    batch = _batch(tokenizer)
    _, logits_before = _run(model, batch, [])
    initial_hooks = count_hooks(model)
    callback = AblationCallback(concepts, prefix_tokens=1)
    callback.on_train_begin(None, None, None, model=model)
    assert count_hooks(model) == initial_hooks + 2
    _, logits_inside = _run(model, batch, [])
    assert not torch.allclose(logits_inside, logits_before, atol=1e-3)
    callback.on_train_end(None, None, None, model=model)
    assert count_hooks(model) == initial_hooks
    assert torch.equal(_run(model, batch, [])[1], logits_before)
    callback.on_train_end(None, None, None, model=model)  # a second end is harmless
    assert count_hooks(model) == initial_hooks


def test_callback_without_model_fails_clearly():
    with pytest.raises(CaftError, match="needs the model"):
        AblationCallback(_concepts([0])).on_train_begin(None, None, None)


def test_concepts_of_the_wrong_width_are_rejected_before_any_hook(model):
    initial_hooks = count_hooks(model)
    with pytest.raises(CaftError, match="width 32 but the model's hidden size is 64"):
        ablate(model, _concepts([0], width=32))
    assert count_hooks(model) == initial_hooks


def test_concepts_at_a_missing_layer_are_rejected(model):
    with pytest.raises(CaftError, match=r"layer\(s\) \[2\]"):
        ablate(model, _concepts([0, 2]))


# ---- project_out -------------------------------------------------------------------------------


def test_project_out_respects_the_position_mask():
    torch.manual_seed(0)
    hidden = torch.randn(2, 4, WIDTH)
    basis = _concepts([0], k=2).bases_by_layer[0]
    mask = torch.tensor([[False, True, True, False], [True, False, False, True]])
    result = project_out(hidden, basis, mask)
    assert torch.equal(result[~mask], hidden[~mask])
    assert _relative_component(result[mask], basis) < 1e-6
    expected = hidden[mask] - (hidden[mask] @ basis.T) @ basis
    torch.testing.assert_close(result[mask], expected)


def test_project_out_without_mask_projects_every_position_and_is_idempotent():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, WIDTH)
    basis = _concepts([0], k=4).bases_by_layer[0]
    once = project_out(hidden, basis)
    assert _relative_component(once, basis) < 1e-6
    torch.testing.assert_close(project_out(once, basis), once)
    torch.testing.assert_close(once + (hidden @ basis.T) @ basis, hidden)  # only Q's span removed


def test_project_out_keeps_the_input_dtype():
    hidden = torch.randn(2, 3, WIDTH).to(torch.bfloat16)
    basis = _concepts([0]).bases_by_layer[0]
    assert project_out(hidden, basis, torch.ones(2, 3, dtype=torch.bool)).dtype == torch.bfloat16
