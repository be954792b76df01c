"""Autointerp: LLM explanations of candidate directions and their relevance to the unwanted concept.

from caft.autointerp import OpenAICompatibleBackend, CachedBackend, explain_and_score
backend = CachedBackend(OpenAICompatibleBackend(model="gpt-4o-mini"), "cache")
results = explain_and_score(windows, description, backend, results_path="autointerp.json")
chosen = select_by_threshold(results, 70)
"""

from caft.autointerp.autointerp import (
    Interpretation,
    explain_and_score,
    explainer_prompt,
    mark_window,
    parse_score,
    relevance_prompt,
    score_from_logprobs,
    select_by_threshold,
    select_top_k,
)
from caft.autointerp.backends import (
    ChatBackend,
    Completion,
    LocalHFBackend,
    OpenAICompatibleBackend,
    Usage,
)
from caft.autointerp.cache import CachedBackend

__all__ = [
    "CachedBackend",
    "ChatBackend",
    "Completion",
    "Interpretation",
    "LocalHFBackend",
    "OpenAICompatibleBackend",
    "Usage",
    "explain_and_score",
    "explainer_prompt",
    "mark_window",
    "parse_score",
    "relevance_prompt",
    "score_from_logprobs",
    "select_by_threshold",
    "select_top_k",
]
