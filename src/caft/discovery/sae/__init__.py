"""Sparse autoencoders as a source of concept directions: one interface over the published formats.

sae = caft.load_sae("path/to/sae_folder")            # SAELens, sparsify, dictionary_learning,
sae.check_compatible(model, layer=6)                 # Gemma Scope or caft's own layout
concepts = sae.to_concept_set([12, 873], layer=6)    # decoder rows, orthonormalised

Where none is published, `train_sae` (or `caft sae train`) trains TopK / BatchTopK SAEs.
"""

from caft.discovery.sae.base import SparseAutoencoder
from caft.discovery.sae.formats import FORMATS, detect_format, load_sae, parse_hook_name
from caft.discovery.sae.train import SAETrainConfig, SAETrainResult, train_sae

__all__ = [
    "FORMATS",
    "SAETrainConfig",
    "SAETrainResult",
    "SparseAutoencoder",
    "detect_format",
    "load_sae",
    "parse_hook_name",
    "train_sae",
]
