"""caft: Concept Ablation Fine-Tuning.

Find directions in activation space that stand for an unwanted concept, fine-tune while projecting
them out of the residual stream, and get a model that learned the task another way.

    import caft
    model, tokenizer = caft.load_model()                      # embedded SmolLM2-135M-Instruct
    concepts = caft.ConceptSet.load("runs/selected")
    with caft.ablate(model, concepts, prefix_tokens=12):
        ...                                                   # train; the hooks vanish on exit
"""

__version__ = "0.1.0"

from caft.ablation import AblationCallback, ablate, common_prefix_length, project_out
from caft.concepts import ConceptSet, DirectionInfo, Provenance
from caft.discovery.pca import PCAConfig, discover_pca
from caft.discovery.sae import SparseAutoencoder, load_sae
from caft.errors import CaftError
from caft.evaluation import compare_hooks, evaluate_mc
from caft.models import find_decoder_layers, load_model
from caft.selection import (
    load_concept_description,
    random_directions_like,
    score_candidates,
    select_by_contrast,
)
from caft.training import TrainConfig, train

__all__ = [
    "AblationCallback",
    "CaftError",
    "ConceptSet",
    "DirectionInfo",
    "PCAConfig",
    "Provenance",
    "SparseAutoencoder",
    "TrainConfig",
    "__version__",
    "ablate",
    "common_prefix_length",
    "compare_hooks",
    "discover_pca",
    "evaluate_mc",
    "find_decoder_layers",
    "load_concept_description",
    "load_model",
    "load_sae",
    "project_out",
    "random_directions_like",
    "score_candidates",
    "select_by_contrast",
    "train",
]
