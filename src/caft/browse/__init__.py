"""`caft browse`: a local web page for reviewing candidate directions and choosing which to ablate.

    from caft.browse import BrowseServer, open_review
    review = open_review("caft-runs/demo/seed_0")   # windows cached in browse_windows.json
    server = BrowseServer(review, port=0)            # http://127.0.0.1:<free port>/
    server.serve_forever()

The page lists every candidate with its token-shaded top/bottom corpus windows, a histogram of its
projection over the corpus, and the scores and explanations earlier steps wrote; saving writes
RUN_DIR/selection.json (rule "manual (caft browse)", with notes) and RUN_DIR/selected.
"""

from caft.browse.review import (
    BACKUP_FILE,
    RULE,
    SELECTED_DIR,
    SELECTION_FILE,
    Review,
    find_candidates,
    open_review,
)
from caft.browse.server import HOST, BrowseServer
from caft.browse.windows import CACHE_FILE, CorpusViews, Histogram, projection_histograms

__all__ = [
    "BACKUP_FILE",
    "CACHE_FILE",
    "HOST",
    "RULE",
    "SELECTED_DIR",
    "SELECTION_FILE",
    "BrowseServer",
    "CorpusViews",
    "Histogram",
    "Review",
    "find_candidates",
    "open_review",
    "projection_histograms",
]
