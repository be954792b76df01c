"""GPU checks (skipped without CUDA): ablation, training and evaluation with tensors on the GPU."""

from __future__ import annotations

import pytest
import torch

import caft
from caft.activations import capture_layer_outputs
from caft.batching import pad_left
from caft.tasks.gender import make_gender_splits
from conftest import tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _concepts(width: int) -> caft.ConceptSet:
    generator = torch.Generator().manual_seed(0)
    return caft.ConceptSet(
        {0: torch.randn(3, width, generator=generator), 1: torch.randn(2, width)}
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ablation_on_gpu_removes_component_and_gradient(tokenizer, dtype):
    model = tiny_llama(len(tokenizer)).to("cuda", dtype)
    concepts = _concepts(64)
    batch = pad_left([tokenizer("The doctor said _____ was late.")["input_ids"]] * 2, 0)
    batch = {k: v.cuda() for k, v in batch.items()}
    with caft.ablate(model, concepts), capture_layer_outputs(model, [0, 1]) as store:
        model(**batch)
        for layer, basis in concepts.bases_by_layer.items():
            hidden = store[layer].float()
            residual = (hidden @ basis.cuda().T).abs().max() / hidden.abs().max()
            assert residual < (1e-5 if dtype == torch.float32 else 2e-2)
    assert caft.ablation.count_hooks(model) == 0


def test_training_and_eval_on_gpu(tokenizer, tmp_path):
    model = tiny_llama(len(tokenizer)).to("cuda")
    splits = make_gender_splits(n_train=32, n_eval=16)
    config = caft.TrainConfig(max_steps=4, batch_size=8, micro_batch_size=8, learning_rate=1e-3)
    result = caft.train(
        model, tokenizer, splits.train, config, concepts=_concepts(64), output_dir=tmp_path
    )
    assert next(result.model.parameters()).device.type == "cuda"
    assert caft.ablation.count_hooks(result.model) == 0
    accuracy = caft.evaluate_mc(result.model, tokenizer, splits.eval_sets["ood"]).accuracy
    assert 0.0 <= accuracy <= 1.0
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_lora_training_on_gpu(tokenizer, tmp_path):
    model = tiny_llama(len(tokenizer)).to("cuda")
    splits = make_gender_splits(n_train=16, n_eval=8)
    config = caft.TrainConfig(
        method="lora", max_steps=2, batch_size=8, micro_batch_size=8, lora_r=4, learning_rate=1e-3
    )
    result = caft.train(
        model, tokenizer, splits.train, config, concepts=_concepts(64), output_dir=tmp_path
    )
    assert (tmp_path / "model" / "adapter_config.json").is_file()
    assert caft.ablation.count_hooks(result.model) == 0
