"""PCA discovery: the streaming covariance, the eigen-decomposition and its sign convention, and
recovery of a planted fine-tuning direction (a stand-in for a fine-tune with a known answer)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from caft.discovery.pca import (
    CovarianceAccumulator,
    PCAConfig,
    accumulate_differences,
    discover_pca,
    top_components,
)
from caft.errors import CaftError
from caft.models import find_decoder_layers
from conftest import tiny_llama


def _token_lists(tokenizer, n: int = 12) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(6, 14, (n,), generator=generator).tolist()
    return [
        torch.randint(10, len(tokenizer), (length,), generator=generator).tolist()
        for length in lengths
    ]


def _plant(model, layer: int, direction: torch.Tensor):
    """Add s_t * v to the layer's output, s_t = 5 x (first coordinate of the hidden state)."""

    def hook(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        shifted = hidden + 5.0 * hidden[..., :1] * direction.to(hidden.dtype)
        return (shifted, *output[1:]) if isinstance(output, tuple) else shifted

    return find_decoder_layers(model)[layer].register_forward_hook(hook)


def _unit(seed: int, dim: int = 64) -> torch.Tensor:
    vector = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    return vector / vector.norm()


def test_accumulator_fed_in_chunks_equals_population_covariance():
    rows = torch.randn(103, 7, generator=torch.Generator().manual_seed(0)) * 3 + 2
    accumulator = CovarianceAccumulator(7)
    for chunk in torch.split(rows, [1, 40, 2, 60]):
        accumulator.update(chunk)
    expected = torch.cov(rows.double().T, correction=0)
    assert accumulator.count == 103
    torch.testing.assert_close(accumulator.mean(), rows.double().mean(0))
    torch.testing.assert_close(accumulator.covariance(), expected)


def test_top_components_match_eigh_with_largest_coordinate_positive():
    factor = torch.randn(9, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    covariance = factor @ factor.T
    components, variances, total = top_components(covariance, 4)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    torch.testing.assert_close(variances, eigenvalues.flip(0)[:4])
    assert total == pytest.approx(eigenvalues.sum().item())
    for component, vector in zip(components, eigenvectors.flip(1).T[:4], strict=True):
        assert abs(torch.dot(component, vector).item()) == pytest.approx(1.0, abs=1e-9)
        assert component[component.abs().argmax()] > 0
    torch.testing.assert_close(covariance @ components.T, components.T * variances)


def test_discover_pca_recovers_planted_direction(tokenizer):
    base = tiny_llama(len(tokenizer))
    finetuned = copy.deepcopy(base)
    direction = _unit(3)
    _plant(finetuned, 1, direction)
    candidates = discover_pca(
        base, finetuned, tokenizer, _token_lists(tokenizer),
        config=PCAConfig(n_components=3), progress=False,
    )  # fmt: skip
    top = candidates.direction("L1.0")
    assert abs(torch.dot(top, direction).item()) > 0.99
    scores = {info.id: info.score for info in candidates.infos}
    assert scores["L1.0"] > 0.9
    assert scores["L1.1"] < 0.01
    assert candidates.count_by_layer() == {0: 3, 1: 3}
    assert candidates.provenance.method == "pca"


def test_discover_pca_layer_without_difference_scores_zero(tokenizer):
    base = tiny_llama(len(tokenizer))
    finetuned = copy.deepcopy(base)
    _plant(finetuned, 1, _unit(4))
    candidates = discover_pca(
        base, finetuned, tokenizer, _token_lists(tokenizer),
        config=PCAConfig(n_components=2), progress=False,
    )  # fmt: skip
    layer0 = candidates.infos_at(0)
    assert [info.score for info in layer0] == [0.0, 0.0]
    assert candidates.provenance.extra["by_layer"]["0"]["total_variance"] == 0.0
    assert torch.isfinite(candidates.bases_by_layer[0]).all()


def test_base_none_with_peft_model_equals_explicit_merged_copy(tokenizer):
    base = tiny_llama(len(tokenizer))
    base_copy = copy.deepcopy(base)
    config = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(base, config).eval()
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    token_lists = _token_lists(tokenizer)
    kwargs = dict(start_positions=1, batch_size=5, progress=False)
    via_adapter = accumulate_differences(None, peft_model, tokenizer, token_lists, [0, 1], **kwargs)
    via_merged = accumulate_differences(base_copy, merged, tokenizer, token_lists, [0, 1], **kwargs)
    for layer in (0, 1):
        assert via_adapter[layer].covariance().abs().max() > 1e-6  # the adapter changes something
        torch.testing.assert_close(
            via_adapter[layer].covariance(), via_merged[layer].covariance(), atol=1e-6, rtol=1e-4
        )
    first = discover_pca(None, peft_model, tokenizer, token_lists, progress=False)
    second = discover_pca(base_copy, merged, tokenizer, token_lists, progress=False)
    assert abs(torch.dot(first.direction("L1.0"), second.direction("L1.0")).item()) > 0.999


def test_base_none_without_peft_model_is_rejected(tokenizer, model):
    with pytest.raises(CaftError, match="only for PEFT models"):
        discover_pca(None, model, tokenizer, _token_lists(tokenizer), progress=False)


def test_bad_layers_name_the_valid_range(tokenizer, model):
    with pytest.raises(CaftError, match=r"\[5\] do not exist.*layers 0\.\.1"):
        discover_pca(
            model, model, tokenizer, _token_lists(tokenizer),
            config=PCAConfig(layers=[0, 5]), progress=False,
        )  # fmt: skip


def test_empty_input_is_rejected(tokenizer, model):
    with pytest.raises(CaftError, match="at least one sequence"):
        discover_pca(model, model, tokenizer, [], progress=False)


def test_different_widths_are_rejected(tokenizer, model):
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        )
    )  # fmt: skip
    with pytest.raises(CaftError, match="different hidden sizes"):
        discover_pca(wider, model, tokenizer, _token_lists(tokenizer), progress=False)


def test_start_position_beyond_sequences_reports_too_few_positions(tokenizer, model):
    with pytest.raises(CaftError, match=r"Layer 0: only 0 positions.*lower the start position"):
        discover_pca(
            model, model, tokenizer, _token_lists(tokenizer), start_positions=50, progress=False
        )
