"""`caft browse` through its HTTP API (urllib, a real server on a free port): the candidates with
their windows and histograms, the saved state, saving (the selection file `caft train --ablate`
takes, the selected set, the backup), refusal of bad input, no file outside the page, the windows
cache, and the `caft browse` command in a subprocess."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from caft.autointerp.autointerp import RESULTS_FORMAT, Interpretation
from caft.browse import (
    BACKUP_FILE,
    CACHE_FILE,
    RULE,
    BrowseServer,
    find_candidates,
    open_review,
)
from caft.cli import _load_concepts, main
from caft.concepts import ConceptSet, DirectionInfo, Provenance
from caft.errors import CaftError
from caft.io import read_json, write_json
from caft.selection import CandidateScore, read_selection, write_selection_file
from conftest import WINDOW_DOCS

DOCS = [doc for doc in WINDOW_DOCS if not doc.startswith("Answer:")]
EXPLANATIONS = {
    "L0.1": "Pronouns: she, her and him after a profession.",
    "L1.2": "Feminine pronouns such as she and her.",
    "L1.3": "Code: function definitions and return statements.",
}


def make_run(folder: Path) -> Path:
    """A run folder as `caft demo` leaves it (discovery/candidates, selection.json by the contrast
    rule) plus an autointerp.json, over 2 layers x 4 random directions of the tiny model (width 64)."""
    generator = torch.Generator().manual_seed(0)
    infos = [
        DirectionInfo(layer=layer, candidate_index=i, score=round(0.4 / (i + 1), 4))
        for layer in (0, 1)
        for i in range(4)
    ]
    candidates = ConceptSet(
        {layer: torch.randn(4, 64, generator=generator) for layer in (0, 1)},
        provenance=Provenance(model="tiny llama", method="pca", data="test prompts"),
        infos=infos,
    )
    candidates.save(folder / "discovery" / "candidates")
    scores = [
        CandidateScore(info.id, info.layer, info.candidate_index, 0.5 + 0.2 * n, passes=n > 2)
        for n, info in enumerate(candidates.infos)
    ]
    write_selection_file(
        folder / "selection.json", selected=["L0.1", "L1.2"], rule="contrast-rule (test)",
        candidates_path=str(folder / "discovery" / "candidates"), scores=scores,
    )  # fmt: skip
    results = [
        asdict(Interpretation(cid, int(cid[1]), int(cid[3]), text, 60.0 + i, "logprob"))
        for i, (cid, text) in enumerate(EXPLANATIONS.items())
    ]
    write_json(folder / "autointerp.json", {"format": RESULTS_FORMAT, "results": results})
    (folder / "corpus.txt").write_text("\n\n".join(DOCS))
    return folder


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return make_run(tmp_path / "run")


@pytest.fixture
def server(run_dir, model, tokenizer):
    review = open_review(
        run_dir, model="tiny", loaded=(model, tokenizer), corpus=run_dir / "corpus.txt",
        n_examples=3, progress=False,
    )  # fmt: skip
    server = BrowseServer(review, port=0)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def get(server, path: str):
    with urllib.request.urlopen(server.url.rstrip("/") + path, timeout=10) as response:
        return response.status, json.loads(response.read())


def post(server, payload, *, headers=None) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(
        server.url + "api/selection",
        data=body,
        headers=headers or {"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def raw_get(server, path: str, host: str | None = None) -> tuple[int, bytes]:
    """A GET with the path sent exactly as given (urllib would normalise '..')."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest("GET", path, skip_host=True)
    connection.putheader("Host", host or f"127.0.0.1:{server.port}")
    connection.endheaders()
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, body


def test_candidates_carry_windows_histograms_scores_and_explanations(server, tokenizer):
    assert server.server_address[0] == "127.0.0.1"
    status, data = get(server, "/api/candidates")
    assert status == 200
    run, candidates = data["run"], data["candidates"]
    assert [c["id"] for c in candidates] == [f"L{layer}.{i}" for layer in (0, 1) for i in range(4)]
    assert run["layers"] == [0, 1] and run["method"] == "pca" and run["n_documents"] == len(DOCS)
    assert set(run["scores"]) == {"discovery", "contrast", "autointerp"}
    # Every document's tokens but position 0 (as in collect_windows), counted once per histogram.
    n_tokens = sum(min(128, len(tokenizer(doc)["input_ids"])) - 1 for doc in DOCS)
    assert run["n_tokens"] == n_tokens
    for candidate in candidates:
        histogram = candidate["histogram"]
        assert sum(histogram["counts"]) == n_tokens and len(histogram["counts"]) == 40
        top, bottom = candidate["windows"]["top"], candidate["windows"]["bottom"]
        assert len(top) == len(bottom) == 3
        for window in top + bottom:
            assert len(window["tokens"]) == len(window["values"]) > window["peak"] >= 0
        # Two independent passes over the corpus agree: the strongest window's peak is the
        # histogram's end (up to the 3 decimals the windows keep).
        assert top[0]["peak_value"] == pytest.approx(histogram["high"], abs=2e-3)
        assert bottom[0]["peak_value"] == pytest.approx(histogram["low"], abs=2e-3)
    by_id = {c["id"]: c for c in candidates}
    assert by_id["L1.2"]["explanation"] == EXPLANATIONS["L1.2"]
    expected = {"discovery": 0.1333, "contrast": 1.7, "autointerp": 61.0}
    assert by_id["L1.2"]["scores"] == pytest.approx(expected)
    assert by_id["L0.0"]["scores"] == pytest.approx({"discovery": 0.4, "contrast": 0.5})


def test_state_shows_the_selection_file_found(server):
    status, state = get(server, "/api/state")
    assert status == 200
    assert state["selected"] == ["L0.1", "L1.2"] and state["rule"] == "contrast-rule (test)"
    assert state["notes"] == {} and state["warnings"] == [] and state["backup"] is None


def test_save_writes_the_selection_file_train_takes_and_reload_shows_it(server, run_dir):
    path = run_dir / "selection.json"
    payload = {
        "selected": ["L1.3", "L0.0", "l1.2"],
        "notes": {"L1.3": "code, not gender", "L0.1": ""},
    }
    status, state = post(server, payload)
    assert status == 200, state
    assert state["selected"] == ["L0.0", "L1.2", "L1.3"]  # normalised, in the candidates' order
    assert state["notes"] == {"L1.3": "code, not gender"} and state["rule"] == RULE
    data = read_json(path)
    assert data["format"] == "caft.selection" and data["rule"] == RULE
    assert data["candidates"] == str((run_dir / "discovery" / "candidates").resolve())
    assert read_selection(path) == ["L0.0", "L1.2", "L1.3"]
    rows = {row["id"]: row for row in data["scores"]}
    assert len(rows) == 8 and rows["L1.3"]["note"] == "code, not gender"
    assert [cid for cid, row in rows.items() if row["selected"]] == ["L0.0", "L1.2", "L1.3"]
    assert rows["L1.3"]["explanation"] == EXPLANATIONS["L1.3"]
    assert rows["L1.3"]["scores"]["contrast"] == pytest.approx(1.9)
    # The contrast rule's file is kept, once; the settings say what it was.
    assert read_json(run_dir / BACKUP_FILE)["rule"] == "contrast-rule (test)"
    assert data["settings"]["previous"]["selected"] == ["L0.1", "L1.2"]
    # What `caft train --ablate` loads: from the file and from the selected set.
    for reference in (path, run_dir / "selected"):
        concepts = _load_concepts(str(reference))
        assert concepts.ids() == ["L0.0", "L1.2", "L1.3"]
    selected = ConceptSet.load(run_dir / "selected")
    assert [info.note for info in selected.infos] == ["", "", "code, not gender"]
    assert {info.selected_by for info in selected.infos} == {RULE}
    assert selected.provenance.model == "tiny llama" and selected.provenance.selection == RULE
    # A reload shows the saved state; a second save keeps the first backup.
    assert get(server, "/api/state")[1] == state
    status, state = post(server, {"selected": ["L0.3"], "notes": {"L1.3": "code"}})
    assert status == 200 and state["selected"] == ["L0.3"] and state["notes"] == {"L1.3": "code"}
    assert read_json(run_dir / BACKUP_FILE)["rule"] == "contrast-rule (test)"
    # Scores and explanations survive browse's own file (no selection file of the rule is left).
    status, data = get(server, "/api/candidates")
    assert data["run"]["scores"].keys() == {"discovery", "contrast", "autointerp"}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"selected": ["L0.1", "L7.0"]}, "Unknown candidate 'L7.0'"),
        ({"selected": ["L0.9"]}, "Unknown candidate 'L0.9'"),
        ({"selected": ["pc3"]}, "Bad direction id 'pc3'"),
        ({"selected": []}, "Nothing is selected"),
        ({"selected": "L0.1"}, '"selected" must be a list'),
        ({"selected": ["L0.1"], "notes": ["x"]}, '"notes" must map ids'),
        ({"selected": ["L0.1"], "notes": {"L5.5": "x"}}, "Unknown candidate 'L5.5'"),
        ({"selected": ["L0.1"], "notes": {"L0.1": "x" * 10_001}}, "longer than"),
        (["L0.1"], "expected {"),
    ],
)
def test_bad_selections_are_refused_and_nothing_is_written(server, run_dir, payload, message):
    before = (run_dir / "selection.json").read_bytes()
    status, body = post(server, payload)
    assert status == 400 and message in body["error"]
    assert (run_dir / "selection.json").read_bytes() == before
    assert not (run_dir / "selected").exists() and not (run_dir / BACKUP_FILE).exists()


def test_requests_that_are_not_a_same_origin_json_save_are_refused(server, run_dir):
    before = (run_dir / "selection.json").read_bytes()
    good = {"selected": ["L0.1"]}
    assert post(server, b"{not json")[0] == 400
    # A form post from another web page: no JSON content type, or a foreign Origin.
    assert post(server, good, headers={"Content-Type": "text/plain"})[0] == 415
    foreign = {"Content-Type": "application/json", "Origin": "http://evil.example"}
    status, body = post(server, good, headers=foreign)
    assert status == 403 and "Cross-origin" in body["error"]
    # DNS rebinding: a page of another name that resolves to 127.0.0.1.
    status, _ = raw_get(server, "/api/state", host=f"evil.example:{server.port}")
    assert status == 403
    assert (run_dir / "selection.json").read_bytes() == before
    same_origin = {"Content-Type": "application/json", "Origin": server.url.rstrip("/")}
    assert post(server, good, headers=same_origin)[0] == 200


def test_no_file_outside_the_page_is_served(server):
    secret = Path(__file__).read_bytes()[:40]
    for path in [
        "/../pyproject.toml",
        "/%2e%2e/%2e%2e/pyproject.toml",
        "/static/../server.py",
        "/server.py",
        "/static/app.js",
        "/..%2f..%2f..%2fetc%2fpasswd",
        "//etc/passwd",
        "/app.js/../../review.py",
        "/tests/test_browse.py",
    ]:
        status, body = raw_get(server, path)
        assert status == 404, path
        assert b"import" not in body and b"root:" not in body and secret not in body
    for path, marker in [("/", b"<!doctype html>"), ("/index.html?x=1", b"app.js"),
                         ("/app.js", b"use strict"), ("/app.css", b"system-ui")]:  # fmt: skip
        status, body = raw_get(server, path)
        assert status == 200 and marker in body, path


def test_page_loads_nothing_from_elsewhere(server):
    _, page = raw_get(server, "/")
    assets = " ".join(raw_get(server, path)[1].decode() for path in ("/app.js", "/app.css"))
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page.decode())
    assert "http://" not in assets.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in assets and "@import" not in assets and "url(" not in assets
    with urllib.request.urlopen(server.url, timeout=10) as response:
        policy = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy


def test_windows_are_cached_and_recomputed_when_the_inputs_change(server, run_dir, tokenizer):
    cache = run_dir / CACHE_FILE
    assert read_json(cache)["format"] == "caft.browse_windows"
    # A restart with the same inputs uses no model: (None, None) would fail if it were used.
    again = open_review(
        run_dir, model="tiny", loaded=(None, None), corpus=run_dir / "corpus.txt", n_examples=3,
        progress=False,
    )  # fmt: skip
    assert again.candidates_payload() == server.review.candidates_payload()
    (run_dir / "other.txt").write_text("\n\n".join(DOCS[:3]))
    with pytest.raises((AttributeError, TypeError)):  # another corpus: the model is needed
        open_review(
            run_dir, model="tiny", loaded=(None, tokenizer), corpus=run_dir / "other.txt",
            n_examples=3, progress=False,
        )  # fmt: skip


def test_a_hand_broken_selection_file_is_kept_before_the_first_save(server, run_dir):
    (run_dir / "selection.json").write_text('{"selected": ["L0.1",')  # an unfinished edit
    status, state = get(server, "/api/state")
    assert status == 200 and state["selected"] == [] and state["rule"] == ""
    assert "not a readable selection file" in state["warnings"][0]
    assert post(server, {"selected": ["L0.2"]})[0] == 200
    assert (run_dir / BACKUP_FILE).read_text() == '{"selected": ["L0.1",'
    assert read_selection(run_dir / "selection.json") == ["L0.2"]


def test_a_busy_port_is_a_clear_error(server):
    with pytest.raises(CaftError, match=f"Cannot listen on 127.0.0.1:{server.port}.*--port 0"):
        BrowseServer(server.review, port=server.port)


def test_finding_the_candidates(tmp_path, run_dir):
    assert find_candidates(run_dir) == run_dir / "discovery" / "candidates"
    with pytest.raises(CaftError, match="no such folder"):
        find_candidates(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaftError, match="no candidates found"):
        find_candidates(tmp_path / "empty")
    with pytest.raises(CaftError, match="is a concept set itself"):
        find_candidates(run_dir / "discovery" / "candidates")
    # An autointerp/select output folder: the selection file names the candidates elsewhere.
    selection_only = tmp_path / "selection_only"
    selection_only.mkdir()
    (selection_only / "selection.json").write_text((run_dir / "selection.json").read_text())
    assert find_candidates(selection_only) == run_dir / "discovery" / "candidates"


def test_cli_errors_cleanly_on_a_folder_without_candidates(tmp_path, capsys):
    assert main(["browse", str(tmp_path), "--no-open", "--port", "0"]) == 2
    assert "no candidates found" in capsys.readouterr().err


def test_cli_serves_a_run(tmp_path, model, tokenizer):
    run_dir = make_run(tmp_path / "run")
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    command = [
        sys.executable, "-m", "caft", "browse", str(run_dir), "--model", str(tmp_path / "tiny"),
        "--corpus", str(run_dir / "corpus.txt"), "--port", "0", "--no-open", "--n-examples", "2",
        "--threads", "1",
    ]  # fmt: skip
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        url = _wait_for_url(process)
        with urllib.request.urlopen(url + "api/candidates", timeout=10) as response:
            data = json.loads(response.read())
        assert len(data["candidates"]) == 8
        assert len(data["candidates"][0]["windows"]["top"]) == 2
        assert url.startswith("http://127.0.0.1:")
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert (run_dir / CACHE_FILE).is_file()


def _wait_for_url(process, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline().decode()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        found = re.search(r"caft browse: (http://\S+/)", line)
        if found:
            return found.group(1)
    raise AssertionError("caft browse did not start:\n" + "".join(lines))
