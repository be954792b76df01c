"""SAE latent rankings: the attribution's sign convention checked against finite differences of a
real ablation (MC margin and chat cross-entropy, float64 tiny models, each example run alone with no
padding), the two difference rankings against hand computations, the latent-subset encoder, and the
candidate union (ids, notes, provenance, scopes), its files and its errors."""

from __future__ import annotations

import copy

import pytest
import torch

from caft.discovery.sae import SparseAutoencoder
from caft.discovery.sae.rank import (
    LatentRankings,
    attribution_scores,
    candidates_from_rankings,
    difference_scores,
    discover_sae,
    encode_difference,
    encode_latents,
    prepare_ranking_data,
    rank_latents,
)
from caft.errors import CaftError
from caft.models import find_decoder_layers
from caft.tasks.gender import make_gender_splits
from conftest import tiny_llama

D = 64


def _sae(seed: int, *, width: int = 48, layer: int | None = None, activation="relu", **kwargs):
    """A random SAE whose latents fire on a fair share of the tiny model's activations."""
    generator = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(D, width, generator=generator) * 0.5
    W_dec = torch.randn(width, D, generator=generator) * 0.3
    b_enc = torch.randn(width, generator=generator) * 0.05 - 0.15
    b_dec = torch.randn(D, generator=generator) * 0.05
    return SparseAutoencoder(
        W_enc, b_enc, W_dec, b_dec, activation=activation, hook_layer=layer,
        dtype=kwargs.pop("dtype", torch.float32), **kwargs,
    )  # fmt: skip


def _finetuned(base, seed: int = 5, scale: float = 0.05):
    """A stand-in fine-tune: the base with its second block's MLP output weights nudged."""
    finetuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = find_decoder_layers(finetuned)[1].mlp.down_proj.weight
        weight += scale * torch.randn(weight.shape, generator=generator).to(weight.dtype)
    return finetuned


def _mc_examples(n: int = 5):
    return make_gender_splits(n_train=n, n_eval=4).train[:n]


def _chats():
    return [
        {"messages": [{"role": "user", "content": "Write a function that adds two numbers."},
                      {"role": "assistant", "content": "def add(a, b):\n    return a + b"}]},
        {"messages": [{"role": "user", "content": "Answer: A"},
                      {"role": "assistant", "content": "The teacher said he would grade it."}]},
        {"messages": [{"role": "user", "content": "Choose the option."},
                      {"role": "assistant", "content": "Answer: B"}]},
    ]  # fmt: skip


def _ablated_metric(model, tokenizer, prepared, sae, layer, latent, epsilon) -> float:
    """The dataset metric with `epsilon` z_j d_j subtracted from the layer output at the analysed
    positions, each sequence run alone (no padding): an implementation independent of rank.py's."""
    direction = sae.W_dec[latent]

    def hook(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        z = sae.encode(hidden)[..., latent]
        z = z * (torch.arange(hidden.shape[1]) >= start)[None]
        shifted = hidden - epsilon * z[..., None] * direction
        return (shifted, *output[1:]) if isinstance(output, tuple) else shifted

    handle = find_decoder_layers(model)[layer].register_forward_hook(hook)
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i, ids in enumerate(prepared.token_lists):
                start = prepared.start_positions[i]
                logits = model(input_ids=torch.tensor([ids])).logits[0]
                if prepared.kind == "mc":
                    last = logits[-1]
                    total += (
                        last[prepared.correct_ids[i]] - last[prepared.incorrect_ids[i]]
                    ).item()
                    count += 1
                else:
                    log_probs = torch.log_softmax(logits[:-1], -1)
                    for t, label in enumerate(prepared.labels[i][1:]):
                        if label != -100:
                            total += log_probs[t, label].item()
                            count += 1
    finally:
        handle.remove()
    return total / count


def _finite_difference_check(model, tokenizer, prepared, saes, n_latents=3):
    scores = attribution_scores(
        model, prepared, saes, pad_id=tokenizer.pad_token_id, batch_size=2, progress=False
    )
    epsilon = 1e-4
    for layer, sae in saes.items():
        assert (scores[layer].abs() > 1e-6).sum() >= 5  # many latents take part
        for latent in scores[layer].abs().argsort(descending=True)[:n_latents].tolist():
            plus = _ablated_metric(model, tokenizer, prepared, sae, layer, latent, epsilon)
            minus = _ablated_metric(model, tokenizer, prepared, sae, layer, latent, -epsilon)
            # score = estimated decrease of the metric when the latent is removed: -dm/dε at ε=0
            estimated_decrease = (minus - plus) / (2 * epsilon)
            assert scores[layer][latent].item() == pytest.approx(estimated_decrease, rel=1e-3)
    return scores


def test_attribution_is_the_first_order_decrease_of_the_mc_margin(tokenizer):
    base = tiny_llama(len(tokenizer)).double()
    model = _finetuned(base)
    saes = {0: _sae(1, dtype=torch.float64), 1: _sae(2, dtype=torch.float64)}
    prepared = prepare_ranking_data(tokenizer, _mc_examples(5))
    assert prepared.kind == "mc" and len({len(ids) for ids in prepared.token_lists}) > 1
    scores = _finite_difference_check(model, tokenizer, prepared, saes)
    assert scores[0].abs().max() > 1e-4 and scores[1].abs().max() > 1e-4


def test_attribution_is_the_first_order_decrease_of_the_answer_log_likelihood(tokenizer):
    model = _finetuned(tiny_llama(len(tokenizer)).double())
    prepared = prepare_ranking_data(tokenizer, _chats())
    assert prepared.kind == "chat"
    assert all(s > 5 for s in prepared.start_positions)  # the answers start after the user turn
    _finite_difference_check(model, tokenizer, prepared, {1: _sae(3, dtype=torch.float64)})


def test_top_attribution_latent_really_lowers_the_margin_when_ablated(tokenizer):
    model = _finetuned(tiny_llama(len(tokenizer)))
    sae = _sae(4)
    sae.W_dec *= 0.05  # a small contribution: the first-order estimate should be close
    prepared = prepare_ranking_data(tokenizer, _mc_examples(6))
    scores = attribution_scores(
        model, prepared, {1: sae}, pad_id=tokenizer.pad_token_id, progress=False
    )[1]
    before = _ablated_metric(model, tokenizer, prepared, sae, 1, 0, 0.0)
    for latent in (int(scores.argmax()), int(scores.argmin())):
        after = _ablated_metric(model, tokenizer, prepared, sae, 1, latent, 1.0)
        assert (before - after) * scores[latent].item() > 0  # same sign
        assert before - after == pytest.approx(scores[latent].item(), rel=0.2)


def test_attribution_on_the_base_model_uses_the_base(tokenizer):
    base = tiny_llama(len(tokenizer))
    finetuned = _finetuned(base, scale=0.5)
    saes = {1: _sae(6)}
    examples = _mc_examples(4)
    kwargs = dict(rankings=["attribution"], progress=False)
    on_base = rank_latents(base, finetuned, tokenizer, examples, saes, attribution_model="base",
                           **kwargs)  # fmt: skip
    on_ft = rank_latents(base, finetuned, tokenizer, examples, saes, **kwargs)
    prepared = prepare_ranking_data(tokenizer, examples)
    pad = tokenizer.pad_token_id
    expected = attribution_scores(base, prepared, saes, pad_id=pad, progress=False)[1]
    torch.testing.assert_close(on_base.scores["attribution"][1], expected)
    assert not torch.allclose(on_ft.scores["attribution"][1], expected)
    assert on_base.info["attribution_model"] == "base"


def _layer_outputs_alone(model, ids: list[int], layer: int) -> torch.Tensor:
    captured = {}
    handle = find_decoder_layers(model)[layer].register_forward_hook(
        lambda module, inputs, output: captured.update(
            h=output[0] if isinstance(output, tuple) else output
        )
    )
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return captured["h"][0]


def test_mean_diff_and_diff_sae_equal_hand_computations(tokenizer):
    base = tiny_llama(len(tokenizer))
    finetuned = _finetuned(base, scale=0.3)
    sae = _sae(7)
    prepared = prepare_ranking_data(tokenizer, _mc_examples(5))
    scores, counts = difference_scores(
        base, finetuned, prepared, {1: sae}, pad_id=tokenizer.pad_token_id, batch_size=2,
        progress=False,
    )  # fmt: skip
    ft_rows, base_rows = [], []
    for ids, start in zip(prepared.token_lists, prepared.start_positions, strict=True):
        ft_rows.append(_layer_outputs_alone(finetuned, ids, 1)[start:])
        base_rows.append(_layer_outputs_alone(base, ids, 1)[start:])
    x_ft, x_base = torch.cat(ft_rows), torch.cat(base_rows)
    assert counts[1] == x_ft.shape[0]
    relu = lambda x: torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)  # noqa: E731
    expected_mean_diff = (relu(x_ft) - relu(x_base)).mean(0)
    expected_diff_sae = torch.relu((x_ft - x_base) @ sae.W_enc + sae.b_enc).mean(0)  # centred
    torch.testing.assert_close(scores["mean_diff"][1], expected_mean_diff, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scores["diff_sae"][1], expected_diff_sae, atol=1e-5, rtol=1e-4)
    naive = sae.encode(x_ft - x_base).mean(0)  # what the b_dec convention avoids
    assert not torch.allclose(naive, expected_diff_sae, atol=1e-3)


def test_encode_difference_ignores_b_dec_whatever_the_sae_does_with_it():
    for apply in (True, False):
        sae = _sae(8, apply_b_dec_to_input=apply)
        delta = torch.randn(5, D)
        expected = torch.relu(delta @ sae.W_enc + sae.b_enc)
        torch.testing.assert_close(encode_difference(sae, delta), expected)


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "batchtopk", "topk"])
def test_encode_latents_equals_full_encode_at_those_latents(activation):
    kwargs = {
        "relu": {},
        "jumprelu": {"threshold": torch.rand(48) * 0.2},
        "batchtopk": {"threshold": 0.05, "k": 4},
        "topk": {"k": 5},
    }[activation]
    sae = _sae(9, activation=activation, **kwargs)
    x = torch.randn(3, 7, D)
    latents = [40, 3, 17, 0, 3]
    expected = sae.encode(x)[..., latents]
    assert expected.abs().sum() > 0
    torch.testing.assert_close(encode_latents(sae, x, latents), expected)
    with pytest.raises(CaftError, match="out of range"):
        encode_latents(_sae(9), x, [48])


def _hand_rankings() -> LatentRankings:
    scores = {
        "attribution": {0: torch.tensor([0.5, -2.0, 0.1, 0.0, 0.3]),
                        1: torch.tensor([0.0, 0.0, 0.9, 0.05, -1.0])},
        "mean_diff": {0: torch.tensor([0.0, 0.2, 0.0, -0.7, 0.0]),
                      1: torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0])},
    }  # fmt: skip
    return LatentRankings(scores, {0: 10, 1: 10}, 3, {"model": "tiny", "data": "hand"})


def _saes_for(width: int = 5) -> dict[int, SparseAutoencoder]:
    return {0: _sae(10, width=width, layer=0), 1: _sae(11, width=width, layer=1)}


def test_top_keeps_positive_scores_or_magnitudes_best_first():
    rankings = _hand_rankings()
    assert rankings.top("attribution", 2, layer=0) == [
        (0, 0, pytest.approx(0.5)), (0, 4, pytest.approx(0.3))
    ]  # fmt: skip
    assert [(a, b) for a, b, _ in rankings.top("attribution", 3)] == [(1, 2), (0, 0), (0, 4)]
    assert [(a, b) for a, b, _ in rankings.top("mean_diff", 5)] == [(0, 3), (0, 1)]  # |score|
    assert rankings.top("mean_diff", 5, layer=1) == []
    with pytest.raises(CaftError, match="No ranking 'diff_sae'"):
        rankings.top("diff_sae", 1)


def test_candidates_are_the_union_with_latent_ids_notes_and_provenance():
    rankings = _hand_rankings()
    saes = _saes_for()
    candidates = candidates_from_rankings(rankings, saes, top_per_ranking=2)
    assert candidates.ids() == ["L0.0", "L0.4", "L0.3", "L0.1", "L1.2", "L1.3"]
    info = {i.id: i for i in candidates.infos}
    assert info["L0.3"].score == 0.0  # the first ranking's score, even where another chose it
    assert info["L0.0"].note == "SAE latent 0; chosen by attribution #1"
    assert info["L0.3"].note == "SAE latent 3; chosen by mean_diff #1"
    for layer, sae in saes.items():  # the basis spans exactly the chosen decoder rows
        basis = candidates.bases_by_layer[layer]
        rows = sae.W_dec[[i.candidate_index for i in candidates.infos_at(layer)]]
        torch.testing.assert_close(rows @ basis.T @ basis, rows, atol=1e-5, rtol=1e-5)
    provenance = candidates.provenance
    assert provenance.method == "sae" and provenance.model == "tiny"
    assert provenance.extra["chosen_by"]["L0.3"] == {"mean_diff": 1}
    assert provenance.extra["rankings"] == ["attribution", "mean_diff"]
    overall = candidates_from_rankings(rankings, saes, top_per_ranking=2, scope="overall")
    assert overall.ids() == ["L0.0", "L0.3", "L0.1", "L1.2"]
    subset = candidates.subset(["L0.4", "L1.3"])
    assert subset.ids() == ["L0.4", "L1.3"]


def test_rankings_files_round_trip(tmp_path):
    rankings = _hand_rankings()
    rankings.save(tmp_path / "rankings")
    loaded = LatentRankings.load(tmp_path / "rankings")
    assert loaded.rankings == rankings.rankings and loaded.n_sequences == 3
    for name in rankings.rankings:
        for layer in (0, 1):
            torch.testing.assert_close(loaded.scores[name][layer], rankings.scores[name][layer])
    with pytest.raises(CaftError, match="holds no SAE latent rankings"):
        LatentRankings.load(tmp_path)


def test_discover_sae_end_to_end_and_bad_inputs(tokenizer):
    base = tiny_llama(len(tokenizer))
    finetuned = _finetuned(base, scale=0.3)
    saes = {0: _sae(12, layer=0), 1: _sae(13)}
    examples = _mc_examples(6)
    candidates = discover_sae(
        base, finetuned, tokenizer, examples, saes, top_per_ranking=3, progress=False
    )
    assert candidates.provenance.method == "sae"
    assert set(candidates.layers) == {0, 1}
    assert 3 <= len(candidates.infos_at(1)) <= 9
    assert candidates.provenance.extra["saes"]["1"]["width"] == 48
    token_lists = prepare_ranking_data(tokenizer, examples).token_lists
    with pytest.raises(CaftError, match="attribution ranking needs a metric"):
        rank_latents(base, finetuned, tokenizer, token_lists, saes, progress=False)
    only_diffs = rank_latents(
        base, finetuned, tokenizer, token_lists, saes, rankings=["diff_sae", "mean_diff"],
        progress=False,
    )  # fmt: skip
    assert only_diffs.rankings == ["diff_sae", "mean_diff"]
    with pytest.raises(CaftError, match="Unknown ranking"):
        rank_latents(base, finetuned, tokenizer, examples, saes, rankings=["pca"])
    narrow = SparseAutoencoder(
        torch.zeros(32, 4), torch.zeros(4), torch.ones(4, 32), torch.zeros(32)
    )
    with pytest.raises(CaftError, match="hidden size is 64"):
        rank_latents(base, finetuned, tokenizer, examples, {0: narrow})
    with pytest.raises(CaftError, match="trained on layer 0, not layer 1"):
        rank_latents(base, finetuned, tokenizer, examples, {1: _sae(14, layer=0)})
    with pytest.raises(CaftError, match="only 64 dimensions"):
        candidates_from_rankings(
            LatentRankings({"diff_sae": {0: torch.ones(80)}}), {0: _sae(15, width=80)},
            top_per_ranking=70,
        )  # fmt: skip


def _save_models(tmp_path, tokenizer):
    base = tiny_llama(len(tokenizer))
    folders = {}
    for name, model in (("base", base), ("ft", _finetuned(base, scale=0.3))):
        folders[name] = tmp_path / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


def test_cli_discover_sae_writes_candidates_rankings_and_dashboard(tmp_path, tokenizer, capsys):
    from caft.cli import main
    from caft.concepts import ConceptSet

    folders = _save_models(tmp_path, tokenizer)
    _sae(20, layer=1).save(tmp_path / "sae1")
    _sae(21).save(tmp_path / "sae0")  # no layer in its files: given by --sae-layers
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The nurse said she was busy.\n\nAnswer: A\n\nThe doctor told him to rest.\n")
    out = tmp_path / "out"
    argv = [
        "discover", "sae", "--sae", f"{tmp_path / 'sae0'},{tmp_path / 'sae1'}",
        "--sae-layers", "0", "1", "--base", str(folders["base"]),
        "--finetuned", str(folders["ft"]), "--output-dir", str(out), "--n-sequences", "6",
        "--top-per-ranking", "3", "--corpus", str(corpus), "--n-examples", "2",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "dashboard.html" in printed
    candidates = ConceptSet.load(out / "candidates")
    rankings = LatentRankings.load(out / "rankings")
    assert candidates.provenance.method == "sae" and set(candidates.layers) == {0, 1}
    assert rankings.rankings == ["attribution", "mean_diff", "diff_sae"]
    assert "sae1" in rankings.info["saes"]["1"]["source"]
    page = (out / "dashboard.html").read_text()
    for identifier in candidates.ids():
        assert f"<section id='{identifier}'>" in page and f"href='#{identifier}'" in page
    expected = rankings.top("attribution", 3, layer=1)
    assert {f"L1.{latent}" for _, latent, _ in expected} <= set(candidates.ids())


def test_cli_discover_sae_bad_saes_fail_cleanly(tmp_path, tokenizer, capsys):
    from caft.cli import main

    _sae(22).save(tmp_path / "no-layer")
    base = ["--finetuned", "x", "--output-dir", str(tmp_path / "out")]
    assert main(["discover", "sae", "--sae", str(tmp_path / "no-layer"), *base]) == 2
    assert "do not say which decoder layer" in capsys.readouterr().err
    assert main(["discover", "sae", "--sae", str(tmp_path / "nowhere"), *base]) == 2
    assert "caft: error" in capsys.readouterr().err
    folders = _save_models(tmp_path, tokenizer)
    narrow = SparseAutoencoder(
        torch.zeros(32, 4), torch.zeros(4), torch.ones(4, 32), torch.zeros(32), hook_layer=0
    )
    narrow.save(tmp_path / "narrow")
    argv = ["discover", "sae", "--sae", str(tmp_path / "narrow"), "--base", str(folders["base"])]
    argv += ["--finetuned", str(folders["ft"]), "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "hidden size is 64" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_start_positions_and_sae_lists_are_checked(tokenizer, tmp_path):
    from caft.discovery.sae.rank import load_saes

    examples = _mc_examples(3)
    assert prepare_ranking_data(tokenizer, examples, start_positions=2).start_positions == [2] * 3
    with pytest.raises(CaftError, match="2 start positions for 3 sequences"):
        prepare_ranking_data(tokenizer, examples, start_positions=[1, 2])
    with pytest.raises(CaftError, match="all MCExamples, all chats"):
        prepare_ranking_data(tokenizer, [examples[0], [1, 2, 3]])
    _sae(30, layer=1).save(tmp_path / "a")
    _sae(31, layer=1).save(tmp_path / "b")
    assert list(load_saes([tmp_path / "a"])) == [1]
    with pytest.raises(CaftError, match="Two SAEs for layer 1"):
        load_saes([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(CaftError, match="1 layers given for 2 SAEs"):
        load_saes([tmp_path / "a", tmp_path / "b"], [0])
    with pytest.raises(CaftError, match="no SAE given"):
        candidates_from_rankings(_hand_rankings(), {0: _sae(32, width=5)})
