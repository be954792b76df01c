"""SAE loading: each published layout written to disk with its own file names, keys, shapes and
conventions, read back through `caft.load_sae`, and checked against an encode/decode computed here
by hand in numpy; caft's and SAELens' layouts round-trip; bad inputs fail with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import caft
from caft.concepts import ConceptSet
from caft.discovery.sae import SparseAutoencoder, load_sae, parse_hook_name
from caft.errors import CaftError
from conftest import tiny_llama

D_IN, D_SAE = 8, 16


def _weights(seed: int = 0, d_in: int = D_IN, d_sae: int = D_SAE) -> dict[str, np.ndarray]:
    """SAELens-convention weights: W_enc [d_in, d_sae], W_dec [d_sae, d_in]."""
    rng = np.random.default_rng(seed)
    return {
        "W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
        "b_enc": rng.normal(scale=0.5, size=d_sae).astype(np.float32),
        "W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),
        "b_dec": rng.normal(scale=0.5, size=d_in).astype(np.float32),
    }


def _inputs(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(5, D_IN)).astype(np.float32)


def _torch(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(value.copy()) for key, value in arrays.items()}


def _relu(a: np.ndarray) -> np.ndarray:
    return np.maximum(a, 0.0)


def _keep_top_k(acts: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros_like(acts)
    for row in range(acts.shape[0]):
        top = np.argsort(-acts[row])[:k]
        out[row, top] = acts[row, top]
    return out


def _check_codec(sae, x: np.ndarray, expected_z: np.ndarray, W_dec: np.ndarray, b_dec):
    z = sae.encode(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(z, expected_z, atol=1e-5)
    assert (expected_z == 0).any() and (expected_z > 0).any()  # the activation did something
    recon = sae.decode(torch.from_numpy(expected_z)).numpy()
    np.testing.assert_allclose(recon, expected_z.astype(np.float64) @ W_dec + b_dec, atol=1e-5)


def _write_saelens(folder: Path, tensors: dict[str, np.ndarray], cfg: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_torch(tensors), str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def _saelens_cfg(architecture: str = "standard", *, hook: str = "blocks.3.hook_resid_post", **kw):
    return {
        "architecture": architecture,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"model_name": "tiny", "hook_name": hook, "sae_lens_version": "6.5.0"},
        **kw,
    }


# ---- each published layout --------------------------------------------------------------------
def test_saelens_standard_sae_encodes_as_relu_of_centred_affine(tmp_path):
    w = _weights()
    sae = load_sae(_write_saelens(tmp_path / "sae", w, _saelens_cfg()))
    assert (sae.d_in, sae.width, sae.hook_layer, sae.activation) == (D_IN, D_SAE, 3, "relu")
    x = _inputs()
    expected = _relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    _check_codec(sae, x, expected, w["W_dec"], w["b_dec"])
    assert torch.equal(sae.decoder_directions(), torch.from_numpy(w["W_dec"]))


@pytest.mark.parametrize("style", ["v6", "pre-v6"])
def test_saelens_topk_sae_keeps_k_largest_in_both_config_styles(tmp_path, style):
    w = _weights(seed=2)
    if style == "v6":
        cfg = _saelens_cfg("topk", k=3)
    else:  # SAELens < 6: flat keys, top-k given as the activation function
        cfg = {
            "d_in": D_IN,
            "d_sae": D_SAE,
            "hook_name": "blocks.1.hook_resid_pre",
            "hook_layer": 1,
            "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": 3},
            "apply_b_dec_to_input": True,
        }
    sae = load_sae(_write_saelens(tmp_path / style, w, cfg))
    x = _inputs()
    expected = _keep_top_k(_relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]), 3)
    _check_codec(sae, x, expected, w["W_dec"], w["b_dec"])
    # blocks.1.hook_resid_pre is the output of decoder layer 0
    assert sae.hook_layer == (3 if style == "v6" else 0)


def test_saelens_jumprelu_uses_threshold_and_respects_apply_b_dec_flag(tmp_path):
    w = _weights(seed=3)
    pre = _inputs() @ w["W_enc"] + w["b_enc"]
    w["threshold"] = np.full(D_SAE, np.median(pre[pre > 0]), dtype=np.float32)
    cfg = _saelens_cfg("jumprelu", apply_b_dec_to_input=False)
    sae = load_sae(_write_saelens(tmp_path / "jr", w, cfg))
    expected = _relu(pre) * (pre > w["threshold"])
    assert ((pre > 0) & (pre <= w["threshold"])).any()  # the threshold removes some activations
    _check_codec(sae, _inputs(), expected, w["W_dec"], w["b_dec"])


def test_dictionary_learning_batchtopk_uses_stored_threshold(tmp_path):
    w = _weights(seed=4)
    x = _inputs()
    post_relu = _relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    threshold = float(np.median(post_relu[post_relu > 0]))
    folder = tmp_path / "resid_post_layer_1" / "trainer_0"
    folder.mkdir(parents=True)
    state = {  # BatchTopKSAE.state_dict(): nn.Linear layouts, [out, in]
        "encoder.weight": torch.from_numpy(w["W_enc"].T.copy()),
        "encoder.bias": torch.from_numpy(w["b_enc"]),
        "decoder.weight": torch.from_numpy(w["W_dec"].T.copy()),
        "b_dec": torch.from_numpy(w["b_dec"]),
        "k": torch.tensor(4, dtype=torch.int),
        "threshold": torch.tensor(threshold, dtype=torch.float32),
    }
    torch.save(state, folder / "ae.pt")
    trainer = {
        "trainer_class": "BatchTopKTrainer",
        "dict_class": "BatchTopKSAE",
        "activation_dim": D_IN,
        "dict_size": D_SAE,
        "k": 4,
        "layer": 1,
        "lm_name": "tiny",
        "submodule_name": "resid_post_layer_1",
    }
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"ctx_len": 8}}))
    sae = load_sae(folder)
    assert (sae.activation, sae.k, sae.hook_layer) == ("batchtopk", 4, 1)
    expected = post_relu * (post_relu > threshold)
    _check_codec(sae, x, expected, w["W_dec"], w["b_dec"])


def test_gemma_scope_params_npz_is_jumprelu_without_centering_and_layer_from_path(tmp_path):
    w = _weights(seed=5)
    x = _inputs()
    pre = x @ w["W_enc"] + w["b_enc"]
    w["threshold"] = np.quantile(_relu(pre), 0.6, axis=0).astype(np.float32)  # per latent
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_2" / "width_16k" / "average_l0_9"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **w)
    sae = load_sae(folder)
    assert (sae.hook_layer, sae.activation, sae.apply_b_dec_to_input) == (2, "jumprelu", False)
    expected = (pre > w["threshold"]) * _relu(pre)
    _check_codec(sae, x, expected, w["W_dec"], w["b_dec"])


def test_gemma_scope_without_layer_in_path_takes_hook_layer_argument(tmp_path):
    w = _weights(seed=5)
    w["threshold"] = np.zeros(D_SAE, dtype=np.float32)
    np.savez(tmp_path / "params.npz", **w)
    assert load_sae(tmp_path).hook_layer is None
    assert load_sae(tmp_path / "params.npz", hook_layer=1).hook_layer == 1


def test_sparsify_hookpoint_folder_is_topk_of_relu_and_found_by_layer(tmp_path):
    w = _weights(seed=6)
    for layer in (0, 1):
        folder = tmp_path / f"layers.{layer}"
        folder.mkdir()
        tensors = {  # SparseCoder: encoder = nn.Linear(d_in, num_latents); W_dec [num_latents, d_in]
            "encoder.weight": w["W_enc"].T.copy(),
            "encoder.bias": w["b_enc"],
            "W_dec": w["W_dec"],
            "b_dec": w["b_dec"],
        }
        save_file(_torch(tensors), str(folder / "sae.safetensors"))
        cfg = {"expansion_factor": 2, "normalize_decoder": True, "num_latents": D_SAE, "k": 2}
        (folder / "cfg.json").write_text(json.dumps({**cfg, "multi_topk": False, "d_in": D_IN}))
    sae = load_sae(tmp_path, hook_layer=1)
    assert (sae.hook_layer, sae.k, sae.metadata["hook_name"]) == (1, 2, "layers.1")
    x = _inputs()
    expected = _keep_top_k(_relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]), 2)
    _check_codec(sae, x, expected, w["W_dec"], w["b_dec"])
    with pytest.raises(CaftError, match=r"several SAEs \(layers\.0, layers\.1\).*sae_id="):
        load_sae(tmp_path)
    assert load_sae(tmp_path, sae_id="layers.0").hook_layer == 0


# ---- round trips ------------------------------------------------------------------------------
def _built(activation: str, *, d_in: int = D_IN, hook_layer: int | None = 2):
    w = _torch(_weights(seed=7, d_in=d_in))
    threshold = {"jumprelu": torch.linspace(0.0, 1.0, D_SAE), "batchtopk": 0.4}.get(activation)
    k = 3 if activation in ("topk", "batchtopk") else None
    return SparseAutoencoder(
        w["W_enc"],
        w["b_enc"],
        w["W_dec"],
        w["b_dec"],
        activation=activation,
        k=k,
        threshold=threshold,
        hook_layer=hook_layer,
        metadata={"model_name": "tiny"},
    )


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu", "batchtopk"])
def test_caft_format_round_trip_is_identical(tmp_path, activation):
    sae = _built(activation)
    loaded = load_sae(sae.save(tmp_path / "sae"))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name))
    assert (loaded.activation, loaded.k, loaded.hook_layer) == (activation, sae.k, 2)
    x = torch.from_numpy(_inputs())
    assert torch.equal(loaded.encode(x), sae.encode(x))


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu", "batchtopk"])
def test_saelens_layout_round_trip_is_identical(tmp_path, activation):
    sae = _built(activation)
    folder = sae.save_saelens(tmp_path / "saelens")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    assert (cfg["d_in"], cfg["d_sae"]) == (D_IN, D_SAE)
    loaded = load_sae(folder)
    assert loaded.metadata["format"] == "saelens"
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name))
    assert loaded.hook_layer == 2
    x = torch.from_numpy(_inputs())
    assert torch.equal(loaded.encode(x), sae.encode(x))


# ---- concept sets -----------------------------------------------------------------------------
def test_to_concept_set_spans_chosen_decoder_rows_with_sae_provenance(tmp_path):
    sae = _built("relu")
    latents = [3, 11, 7]
    concepts = sae.to_concept_set(latents, data="unit test", selection="by hand")
    basis = concepts.bases_by_layer[2]
    torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-5, rtol=0)
    rows = sae.W_dec[latents]
    torch.testing.assert_close(rows @ basis.T @ basis, rows, atol=1e-4, rtol=0)
    assert concepts.ids() == ["L2.3", "L2.11", "L2.7"]
    assert concepts.provenance.method == "sae"
    assert concepts.provenance.extra["latents"] == latents
    reloaded = ConceptSet.load(concepts.save(tmp_path / "concepts"))
    assert reloaded.provenance.method == "sae" and torch.equal(reloaded.bases_by_layer[2], basis)


def test_to_concept_set_rejects_other_layer_and_bad_latents():
    sae = _built("relu")
    with pytest.raises(CaftError, match="trained on layer 2, not layer 0"):
        sae.to_concept_set([1], layer=0)
    with pytest.raises(CaftError, match="out of range: this SAE has 16 latents"):
        sae.to_concept_set([16])
    with pytest.raises(CaftError, match="layer of this SAE is unknown: pass layer="):
        _built("relu", hook_layer=None).to_concept_set([1])


# ---- bad inputs -------------------------------------------------------------------------------
def test_folder_of_another_format_is_refused_with_the_layouts_listed(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    with pytest.raises(CaftError) as info:
        load_sae(folder)
    message = str(info.value)
    assert str(folder) in message and "not an SAE" in message and "model.safetensors" in message
    assert "cfg.json + sae_weights.safetensors" in message and "params.npz" in message


def test_saelens_file_missing_a_tensor_names_file_and_key(tmp_path):
    w = _weights()
    del w["W_enc"]
    folder = _write_saelens(tmp_path / "sae", w, _saelens_cfg())
    with pytest.raises(CaftError, match=r"sae_weights\.safetensors: missing W_enc"):
        load_sae(folder)


def test_declared_width_differing_from_weights_is_refused(tmp_path):
    folder = _write_saelens(tmp_path / "sae", _weights(), {**_saelens_cfg(), "d_sae": 32})
    with pytest.raises(CaftError, match=r"cfg\.json: declares d_sae=32 but the weights have 16"):
        load_sae(folder)


def test_nan_weights_are_refused_naming_file_and_tensor(tmp_path):
    w = _weights()
    w["W_dec"][4, 2] = np.nan
    folder = _write_saelens(tmp_path / "sae", w, _saelens_cfg())
    with pytest.raises(CaftError, match=r"sae_weights\.safetensors: W_dec contains 1 NaN"):
        load_sae(folder)


def test_sae_width_not_matching_model_is_refused():
    model = tiny_llama(64)  # hidden size 64
    with pytest.raises(CaftError, match="reads 8-dimensional activations but the model's hidden"):
        _built("relu").check_compatible(model)


def test_layer_the_sae_was_not_trained_on_is_refused(tmp_path):
    model = tiny_llama(64)
    folder = _built("topk", d_in=64, hook_layer=0).save_saelens(tmp_path / "sae")
    sae = load_sae(folder)
    sae.check_compatible(model, layer=0)  # the right layer passes
    with pytest.raises(CaftError, match=r"trained on layer 0 \(blocks\.0\.hook_resid_post\), not"):
        sae.check_compatible(model, layer=1)
    with pytest.raises(CaftError, match="trained on layer 0"):
        load_sae(folder, hook_layer=1)


def test_sae_on_a_non_residual_hook_is_refused_for_ablation(tmp_path):
    assert parse_hook_name("blocks.5.hook_resid_pre") == (4, "resid_post")
    folder = _write_saelens(
        tmp_path / "mlp", _weights(), _saelens_cfg(hook="blocks.0.hook_mlp_out")
    )
    sae = load_sae(folder)
    assert (sae.hook_layer, sae.hook_site) == (0, "mlp_out")
    model = tiny_llama(64)
    wide = _built("relu", d_in=64)
    wide.hook_site = sae.hook_site
    with pytest.raises(CaftError, match="not the residual stream"):
        wide.check_compatible(model)


class _Marker:
    """A non-tensor object; unpickling it would run __setstate__."""

    ran: list = []  # noqa: RUF012

    def __setstate__(self, state):
        _Marker.ran.append(state)


def test_pt_file_with_pickled_object_is_refused_without_running_it(tmp_path):
    folder = tmp_path / "dl"
    folder.mkdir()
    w = _weights()
    marker = _Marker()
    marker.payload = 1
    state = {
        "encoder.weight": torch.from_numpy(w["W_enc"].T.copy()),
        "encoder.bias": torch.from_numpy(w["b_enc"]),
        "decoder.weight": torch.from_numpy(w["W_dec"].T.copy()),
        "b_dec": torch.from_numpy(w["b_dec"]),
        "extra": marker,
    }
    torch.save(state, folder / "ae.pt")
    trainer = {"dict_class": "AutoEncoderTopK", "activation_dim": D_IN, "dict_size": D_SAE, "k": 2}
    (folder / "config.json").write_text(json.dumps({"trainer": {**trainer, "layer": 0}}))
    with pytest.raises(CaftError, match=r"ae\.pt: refused to load.*weights_only=True"):
        load_sae(folder)
    assert _Marker.ran == []


def test_hub_id_without_network_says_to_pass_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CaftError) as info:
        load_sae("caft-tests/no-such-sae", sae_id="layer_3")
    message = str(info.value)
    assert "Hub is unreachable" in message and "local folder" in message
    assert "caft-tests/no-such-sae" in message


def test_name_that_is_neither_folder_nor_hub_id_is_reported():
    with pytest.raises(CaftError, match="not a local folder"):
        caft.load_sae("gpt2-small-res-jb-that-does-not-exist")
