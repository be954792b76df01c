"""SAE training on a tiny Llama: it learns (FVE far above an untrained SAE), keeps its invariants
(unit-norm decoder, L0 = k, a BatchTopK threshold giving L0 ≈ k), counts dead latents and switches
AuxK on for them, folds the input scale into the saved weights, resumes bit for bit after a crash,
refuses a changed config, splices reconstructions into the forward pass correctly, round-trips
through caft's and SAELens' formats, and runs end to end from the CLI."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from caft.activations import iterate_layer_outputs
from caft.cli import main
from caft.discovery.sae import load_sae
from caft.discovery.sae.base import SparseAutoencoder
from caft.discovery.sae.train import (
    SAETrainConfig,
    SAETrainer,
    next_token_loss,
    parse_layers,
    reconstruction_metrics,
    split_documents,
    token_chunks,
    train_sae,
)
from caft.errors import CaftError
from conftest import tiny_llama

PAD = 0  # the test tokenizer's <|endoftext|>
WORDS = [
    "the",
    "river",
    "cold",
    "morning",
    "baker",
    "bread",
    "village",
    "market",
    "green",
    "hills",
    "slow",
    "train",
    "window",
    "letter",
    "garden",
    "rain",
    "old",
    "bridge",
    "small",
    "boat",
    "harbour",
    "evening",
    "lamp",
    "quiet",
    "street",
    "music",
    "teacher",
    "school",
    "children",
    "paper",
    "kitchen",
    "soup",
    "winter",
    "snow",
    "mountain",
    "path",
    "forest",
    "bird",
    "song",
    "table",
    "chair",
    "friend",
]


def _corpus(n_documents: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    documents = []
    for _ in range(n_documents):
        sentences = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 10))).capitalize() + "."
            for _ in range(rng.randint(2, 4))
        ]
        documents.append(" ".join(sentences))
    return documents


def _config(**changes) -> SAETrainConfig:
    base = SAETrainConfig(
        layers=[1], width=128, k=8, total_tokens=64 * 120, batch_size=64, context=32,
        buffer_rows=512, dead_after=4000, checkpoint_every=20, lr=4e-3, seed=0,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


def _held_out_chunks(tokenizer, config: SAETrainConfig) -> list[list[int]]:
    _, held = split_documents(_corpus(), config.holdout_fraction, config.seed)
    return token_chunks(tokenizer, held, config.context)


def _log(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lm(tokenizer):
    return tiny_llama(len(tokenizer))


@pytest.fixture(scope="module")
def topk_run(lm, tokenizer, tmp_path_factory):
    output = tmp_path_factory.mktemp("topk")
    results = train_sae(lm, tokenizer, _corpus(), _config(), output_dir=output, progress=False)
    return output, results


@pytest.fixture(scope="module")
def batchtopk_run(lm, tokenizer, tmp_path_factory):
    output = tmp_path_factory.mktemp("batchtopk")
    config = _config(architecture="batchtopk", layers=[0, 1])
    return output, train_sae(lm, tokenizer, _corpus(), config, output_dir=output, progress=False)


# ---- learning and invariants -----------------------------------------------------------------
def test_training_lowers_the_loss_and_beats_an_untrained_sae(lm, tokenizer, topk_run):
    output, results = topk_run
    curve = _log(output / "layer_1")
    assert [row["step"] for row in curve] == list(range(1, 121))
    early = sum(row["mse"] for row in curve[:5]) / 5
    late = sum(row["mse"] for row in curve[-5:]) / 5
    assert late < 0.5 * early

    config = _config()
    chunks = _held_out_chunks(tokenizer, config)
    held = torch.cat(
        [out[1][mask] for out, mask, _ in iterate_layer_outputs(lm, chunks, [1], pad_id=PAD)]
    )
    untrained = SAETrainer(64, config, seed=1)
    untrained.initialise(held[:256])  # the same scale and b_dec initialisation, no training
    untrained_sae = untrained.to_sae(hook_layer=1, metadata={})
    baseline = reconstruction_metrics(lm, {1: untrained_sae}, chunks, pad_id=PAD)[1]["fve"]
    trained_sae = results[1].sae
    fve = results[1].metrics["fve"]
    assert fve == pytest.approx(
        reconstruction_metrics(lm, {1: trained_sae}, chunks, pad_id=PAD)[1]["fve"], abs=1e-6
    )
    assert fve > 0.6
    assert fve > baseline + 0.3


def test_decoder_rows_are_unit_norm_and_topk_l0_is_k(topk_run, lm, tokenizer):
    _, results = topk_run
    sae = results[1].sae
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(sae.width), atol=1e-5)
    assert sae.activation == "topk" and sae.k == 8
    assert results[1].metrics["mean_l0"] == pytest.approx(8, abs=0.01)
    x = torch.randn(50, 64) * 5
    assert ((sae.encode(x) > 0).sum(-1) <= 8).all()


def test_batchtopk_stores_a_threshold_giving_l0_near_k(batchtopk_run):
    output, results = batchtopk_run
    for layer in (0, 1):
        sae, metrics = results[layer].sae, results[layer].metrics
        assert sae.activation == "batchtopk"
        assert float(sae.threshold) > 0
        assert metrics["threshold"] == pytest.approx(float(sae.threshold))
        assert 0.5 * 8 < metrics["mean_l0"] < 2 * 8
        assert metrics["fve"] > 0.5
        assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(sae.width), atol=1e-5)
    # one forward pass fed both layers: their logs have the same steps and tokens
    assert [r["tokens"] for r in _log(output / "layer_0")] == [
        r["tokens"] for r in _log(output / "layer_1")
    ]


def test_results_files_hold_every_metric(topk_run):
    output, _ = topk_run
    saved = json.loads((output / "results.json").read_text())
    metrics = saved["layers"]["1"]
    for key in (
        "fve", "mean_l0", "dead_fraction", "ce_loss_clean", "ce_loss_spliced",
        "ce_loss_zero_ablated", "ce_loss_recovered", "training_seconds", "training_cpu_seconds",
        "tokens_trained",
        "input_scale", "held_out_documents", "eval_tokens",
    ):  # fmt: skip
        assert key in metrics, key
    assert metrics["tokens_trained"] == 64 * 120
    assert metrics["ce_loss_clean"] <= metrics["ce_loss_spliced"] + 0.05
    assert metrics["ce_loss_zero_ablated"] != metrics["ce_loss_clean"]
    assert "| 1 | topk | 128 | 8 |" in (output / "results.md").read_text()
    assert not (output / "layer_1" / "checkpoint").exists()  # removed once finished


# ---- formats -----------------------------------------------------------------------------------
@pytest.mark.parametrize("run", ["topk_run", "batchtopk_run"])
def test_caft_and_saelens_folders_load_back_identically(request, run):
    output, results = request.getfixturevalue(run)
    layer = 1
    trained = results[layer].sae
    from_caft = load_sae(output / f"layer_{layer}" / "caft")
    from_saelens = load_sae(output / f"layer_{layer}" / "saelens")
    for sae in (from_caft, from_saelens):
        assert sae.hook_layer == layer
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(sae, name), getattr(trained, name)), name
    assert from_caft.activation == trained.activation
    assert from_caft.metadata["metrics"]["fve"] == results[layer].metrics["fve"]
    assert from_caft.metadata["hook_name"] == f"blocks.{layer}.hook_resid_post"
    x = torch.randn(40, 64) * 4
    assert torch.equal(from_caft.encode(x), trained.encode(x))
    assert torch.allclose(from_saelens.encode(x), trained.encode(x))


def test_input_scale_is_folded_into_the_saved_weights():
    config = _config(architecture="batchtopk", width=32, k=4)
    trainer = SAETrainer(16, config, seed=3)
    x_raw = torch.randn(64, 16) * 40 + 7
    trainer.initialise(x_raw)
    scale = trainer.input_scale
    assert (x_raw * scale).pow(2).sum(-1).mean() == pytest.approx(16, rel=1e-4)
    for _ in range(3):
        trainer.step(x_raw, 1e-2, record_threshold=True)
    sae = trainer.to_sae(hook_layer=0, metadata={})
    with torch.no_grad():
        acts = trainer.encode(x_raw * scale).acts
        normalised = acts * (acts > trainer.threshold())
        reconstruction = normalised @ trainer.W_dec + trainer.b_dec
    assert torch.allclose(sae.encode(x_raw) * scale, normalised, atol=1e-4)
    assert torch.allclose(sae.decode(sae.encode(x_raw)) * scale, reconstruction, atol=1e-3)


# ---- dead latents and AuxK -----------------------------------------------------------------------
def test_dead_latents_are_counted_and_only_they_switch_auxk_on():
    config = _config(width=4, k=1, dead_after=100, aux_k=2)
    trainer = SAETrainer(4, config, seed=0)
    x = torch.tensor([5.0, 1.0, 1.0, 1.0]) + torch.rand(10, 4) * 0.5 * torch.tensor([0, 1, 1, 1])
    # latent 0 always wins the top-1; the others vary, so the residual error has a pattern
    trainer.initialise(x)
    with torch.no_grad():
        trainer.W_enc.copy_(torch.eye(4))
        trainer.W_dec.copy_(torch.eye(4))
        trainer.b_dec.zero_()
    for step in range(1, 13):
        row = trainer.step(x, 0.0)  # lr 0: the weights stay, only the counters move
        silent = trainer.tokens_since_fired[1:]
        assert trainer.tokens_since_fired[0] == 0
        assert (silent == 10 * step).all()
        dead = 10 * step >= 100
        assert row["dead_fraction"] == (0.75 if dead else 0.0)
        assert (row["aux_loss"] > 0) == dead, step
    # a dead latent that fires again is alive: its counter resets
    trainer.step(torch.tensor([[1.0, 6.0, 1.0, 1.0]]).repeat(10, 1), 0.0)
    assert trainer.tokens_since_fired[1] == 0 and trainer.tokens_since_fired[0] == 10


def test_auxk_gradient_reaches_the_dead_latents():
    config = _config(width=4, k=1, dead_after=10, aux_k=2)
    trainer = SAETrainer(4, config, seed=0)
    x = torch.tensor([5.0, 2.0, 1.0, 0.5]) + torch.rand(10, 4) * 0.5 * torch.tensor([0, 1, 1, 1])
    trainer.initialise(x)
    with torch.no_grad():
        trainer.W_enc.copy_(torch.eye(4))
        trainer.b_dec.zero_()
    trainer.step(x, 0.0)  # now latents 1..3 are dead
    before = trainer.W_enc.detach().clone()
    trainer.step(x, 1e-2)
    assert not torch.equal(trainer.W_enc[:, 1], before[:, 1])  # moved by AuxK alone


# ---- resume ------------------------------------------------------------------------------------
def test_resume_after_a_crash_matches_an_uninterrupted_run(lm, tokenizer, tmp_path, monkeypatch):
    config = _config(total_tokens=64 * 50, layers=[0, 1], checkpoint_every=20)
    straight = train_sae(
        lm, tokenizer, _corpus(), config, output_dir=tmp_path / "a", progress=False
    )

    calls = {"n": 0}
    real_step = SAETrainer.step

    def crashing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2 * 27:  # two layers per step: crash in step 28, after the step-20 save
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(SAETrainer, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train_sae(lm, tokenizer, _corpus(), config, output_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(SAETrainer, "step", real_step)
    saved = json.loads((tmp_path / "b/layer_0/checkpoint/state.json").read_text())
    assert saved["step"] == 20 and saved["tokens_seen"] == 20 * 64
    assert len(_log(tmp_path / "b/layer_0")) == 27

    resumed = train_sae(lm, tokenizer, _corpus(), config, output_dir=tmp_path / "b", progress=False)
    for layer in (0, 1):
        assert resumed[layer].trained_now
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(
                getattr(resumed[layer].sae, name), getattr(straight[layer].sae, name)
            )
        steps = [row["step"] for row in _log(tmp_path / "b" / f"layer_{layer}")]
        assert steps == list(range(1, 51))
        assert resumed[layer].metrics["fve"] == straight[layer].metrics["fve"]


def test_stop_after_steps_then_resume_and_finished_layers_are_not_retrained(
    lm, tokenizer, tmp_path
):
    config = _config(total_tokens=64 * 40, layers=[1])
    partial = train_sae(
        lm, tokenizer, _corpus(), config, output_dir=tmp_path, progress=False, stop_after_steps=15
    )
    assert not partial[1].finished and partial[1].step == 15
    assert json.loads((tmp_path / "layer_1/checkpoint/state.json").read_text())["step"] == 15
    done = train_sae(lm, tokenizer, _corpus(), config, output_dir=tmp_path, progress=False)
    assert done[1].finished and done[1].trained_now and done[1].step == 40
    log_before = (tmp_path / "layer_1/log.jsonl").read_text()
    # adding a layer trains only the new one; layer 1 is read back
    more = train_sae(
        lm, tokenizer, _corpus(), dataclasses.replace(config, layers=[0, 1]),
        output_dir=tmp_path, progress=False,
    )  # fmt: skip
    assert not more[1].trained_now and more[0].trained_now
    assert torch.equal(more[1].sae.W_enc, done[1].sae.W_enc)
    assert (tmp_path / "layer_1/log.jsonl").read_text() == log_before
    assert set(json.loads((tmp_path / "results.json").read_text())["layers"]) == {"0", "1"}


def test_a_changed_config_is_refused(lm, tokenizer, tmp_path, topk_run):
    output, _ = topk_run
    with pytest.raises(CaftError, match="width: 128 there, 256 now"):
        train_sae(lm, tokenizer, _corpus(), _config(width=256), output_dir=output, progress=False)
    with pytest.raises(CaftError, match="corpus_sha256"):
        train_sae(lm, tokenizer, _corpus(seed=5), _config(), output_dir=output, progress=False)
    config = _config(total_tokens=64 * 30)
    train_sae(
        lm, tokenizer, _corpus(), config, output_dir=tmp_path, progress=False, stop_after_steps=5
    )
    with pytest.raises(CaftError, match=r"checkpoint trained with other settings.*k: 8 there"):
        train_sae(
            lm, tokenizer, _corpus(), dataclasses.replace(config, k=4), output_dir=tmp_path,
            progress=False,
        )  # fmt: skip


# ---- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"layers": [2]}, "Layer 2 is out of range.*0..1"),
        ({"layers": [-1]}, "out of range"),
        ({"layers": []}, "Choose the layers"),
        ({"k": 128}, "k must be between 1 and width - 1"),
        ({"k": 0}, "k must be between 1"),
        ({"architecture": "relu"}, "Unknown SAE architecture"),
        ({"total_tokens": 10}, "less than one batch"),
        ({"holdout_fraction": 0.0}, "holdout_fraction"),
    ],
)
def test_bad_settings_are_clear_errors(lm, tokenizer, tmp_path, changes, message):
    with pytest.raises(CaftError, match=message):
        train_sae(lm, tokenizer, _corpus(), _config(**changes), output_dir=tmp_path)


def test_empty_or_tiny_corpus_is_a_clear_error(lm, tokenizer, tmp_path):
    with pytest.raises(CaftError, match="corpus is empty"):
        train_sae(lm, tokenizer, ["", "  "], _config(), output_dir=tmp_path)
    with pytest.raises(CaftError, match="at least 2"):
        train_sae(lm, tokenizer, ["One lonely document."], _config(), output_dir=tmp_path)


def test_parse_layers():
    assert parse_layers("3,9, 15") == [3, 9, 15]
    with pytest.raises(CaftError, match="comma-separated integers"):
        parse_layers("3,x")


# ---- splicing ----------------------------------------------------------------------------------
def test_a_perfect_sae_spliced_in_leaves_the_loss_unchanged(lm, tokenizer):
    d = 64
    identity = torch.eye(d)
    perfect = SparseAutoencoder(  # relu(x) - relu(-x) = x: an exact reconstruction
        torch.cat([identity, -identity], 1), torch.zeros(2 * d),
        torch.cat([identity, -identity], 0), torch.zeros(d), activation="relu",
    )  # fmt: skip
    chunks = token_chunks(tokenizer, _corpus(6), 32)
    clean = next_token_loss(lm, chunks, pad_id=PAD)
    spliced = next_token_loss(
        lm, chunks, pad_id=PAD, layer=0, replace=lambda x: perfect.decode(perfect.encode(x))
    )
    zeroed = next_token_loss(lm, chunks, pad_id=PAD, layer=0, replace=torch.zeros_like)
    assert spliced == pytest.approx(clean, abs=1e-5)
    assert abs(zeroed - clean) > 1e-3
    assert next_token_loss(lm, chunks, pad_id=PAD) == pytest.approx(clean, abs=1e-7)  # hook gone


def test_chunks_start_with_bos_and_join_documents_with_eos(tokenizer):
    chunks = token_chunks(tokenizer, ["a b c", "d e"], 4)
    flat = [t for chunk in chunks for t in chunk[1:]]
    assert all(chunk[0] == tokenizer.bos_token_id for chunk in chunks)
    assert all(len(chunk) <= 4 for chunk in chunks)
    assert tokenizer.eos_token_id in flat


# ---- CLI ---------------------------------------------------------------------------------------
def test_cli_trains_and_reports(tmp_path, tokenizer, capsys):
    lm = tiny_llama(len(tokenizer), seed=4)
    lm.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "corpus.txt").write_text("\n\n".join(_corpus(20)))
    argv = [
        "sae", "train", "--model", str(tmp_path / "model"), "--layers", "0,1", "--width", "64",
        "--k", "4", "--tokens", "1920", "--batch-size", "64", "--context", "32",
        "--checkpoint-every", "10", "--corpus", str(tmp_path / "corpus.txt"),
        "--output-dir", str(tmp_path / "out"), "--threads", "1",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "out" / "results.md") in out
    assert "layer 0: FVE" in out and "layer 1: FVE" in out
    assert load_sae(tmp_path / "out" / "layer_1" / "saelens").hook_layer == 1
    assert main([*argv[:8], "--k", "64", *argv[10:]]) == 2  # k == width
    assert "k must be between 1 and width - 1" in capsys.readouterr().err
    assert main([*argv[:4], "--layers", "5", *argv[6:]]) == 2
    assert "out of range" in capsys.readouterr().err


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_sparse_decoding_matches_the_dense_product(architecture):
    trainer = SAETrainer(16, _config(architecture=architecture, width=32, k=4), seed=2)
    x = torch.randn(20, 16)
    trainer.initialise(x)
    with torch.no_grad():
        kept = trainer.encode(x * trainer.input_scale)
        dense = trainer.dense_latents(kept)
        expected = dense @ trainer.W_dec + trainer.b_dec
        assert torch.allclose(trainer.decode(kept), expected, atol=1e-5)
    l0 = (dense > 0).sum(-1)
    if architecture == "topk":
        assert (l0 == 4).all()
    else:
        assert l0.sum() == 4 * 20 and l0.max() > l0.min()  # k·B kept over the batch, unevenly


def test_cli_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sae", "train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--layers", "--width", "--k", "--architecture", "--tokens", "--corpus",
                   "--output-dir", "--lr", "--batch-size", "--context", "--checkpoint-every",
                   "--seed", "--threads"):  # fmt: skip
        assert option in text
