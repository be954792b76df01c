"""Autointerp: explanations and relevance scores from an LLM, through the real client code.

The API backend talks to a local OpenAI-compatible HTTP server started here (log-probabilities,
scripted 429/500/404 answers, delays, dropped connections); the local backend runs the tiny model.
Covered: the probability-weighted score and its None / parsed fallbacks, retries and clear errors,
the disk cache, token counts, the concurrency limit, resuming after a crash, and `caft autointerp`.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from caft.autointerp import (
    CachedBackend,
    LocalHFBackend,
    OpenAICompatibleBackend,
    explain_and_score,
    explainer_prompt,
    mark_window,
    parse_score,
    score_from_logprobs,
    select_by_threshold,
    select_top_k,
)
from caft.cli import main
from caft.concepts import ConceptSet, Provenance
from caft.displays import Window, collect_windows
from caft.errors import CaftError
from caft.models import hidden_size
from caft.selection import ConceptDescription, load_concept_description
from caft.tasks.gender import default_contrast_path
from conftest import tiny_llama

KEY_ENV = "CAFT_TEST_API_KEY"
KEY = "sk-test-secret-123"
EXPLANATION = "Fires on gendered pronouns such as she and him."
DESCRIPTION = ConceptDescription(
    concept="gender",
    description="The gender of people: gendered pronouns and stereotyped professions.",
    contrast_sets=[],
    examples=["The nanny waved goodbye as _____ drove away."],
    pointers=["Not the grammatical case of the pronoun."],
)


def _logprobs(**probabilities: float) -> dict[str, float]:
    return {key.removeprefix("n"): math.log(p) for key, p in probabilities.items()}


class ChatServer:
    """A local OpenAI-compatible endpoint: POST /v1/chat/completions, with scripted behaviour."""

    def __init__(self, *, model: str = "test-model"):
        self.model = model
        self.requests: list[dict] = []
        self.script: list = []  # per request, in order: "429", "500", ("delay", seconds)
        self.scores = [_logprobs(n80=0.5, n60=0.25, n70=0.15, hello=0.1)]  # cycled
        self.logprobs = True  # False: ignore the logprobs request, like some servers
        self.reject_logprobs = False  # True: answer 400 to a request for logprobs
        self.parsed_reply = "I would say 85."
        self.drop_after: int | None = None  # then every connection is dropped unanswered
        self.in_flight = self.max_in_flight = 0
        self._score_requests = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                server._handle(self)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handle(self, handler):
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        with self._lock:
            answered = len(self.requests)
            self.requests.append(body)
            action = self.script.pop(0) if self.script else None
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.drop_after is not None and answered >= self.drop_after:
                handler.close_connection = True  # the server "dies": no answer at all
            elif action in ("429", "500"):
                self._send(handler, int(action), {"error": {"message": f"scripted {action}"}})
            elif handler.headers.get("Authorization") != f"Bearer {KEY}":
                self._send(handler, 401, {"error": {"message": "Incorrect API key provided."}})
            elif self.reject_logprobs and body.get("logprobs"):
                self._send(handler, 400, {"error": {"message": "logprobs are not supported"}})
            elif body["model"] != self.model:
                error = {"message": f"The model `{body['model']}` does not exist.", "code": "model_not_found"}  # fmt: skip
                self._send(handler, 404, {"error": error})
            else:
                if isinstance(action, tuple):
                    time.sleep(action[1])
                self._send(handler, 200, self._completion(body))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (time-out)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _completion(self, body: dict) -> dict:
        logprobs = None
        if body.get("logprobs") and self.logprobs:
            with self._lock:
                top = self.scores[self._score_requests % len(self.scores)]
                self._score_requests += 1
            best = max(top, key=top.get)
            alternatives = [{"token": t, "logprob": lp, "bytes": None} for t, lp in top.items()]
            entry = {"token": best, "logprob": top[best], "bytes": None}
            logprobs = {"content": [entry | {"top_logprobs": alternatives}]}
            text = best
        else:
            text = self.parsed_reply if body["max_tokens"] <= 8 else EXPLANATION
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": logprobs,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13},
        }

    @staticmethod
    def _send(handler, status: int, payload: dict):
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


@pytest.fixture
def server():
    chat_server = ChatServer()
    yield chat_server
    chat_server.close()


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def _backend(url: str, model: str = "test-model", **options) -> OpenAICompatibleBackend:
    settings = {"api_key_env": KEY_ENV, "max_retries": 3, "backoff": 0.01, "timeout": 5.0}
    return OpenAICompatibleBackend(url, model, **(settings | {"concurrency": 1} | options))


def _window(tokens: list[str], values: list[float]) -> Window:
    peak = max(range(len(values)), key=lambda i: abs(values[i]))
    return Window(0, tokens, values, peak, values[peak])


def _windows(n: int) -> dict:
    """n candidates with the same windows but for a last token: n different explainer prompts."""
    tokens, values = ["The", " nurse", " said", " she", " left"], [0.1, 0.9, 0.2, 1.0, 0.4]
    bottom = _window(["A", " red", " car"], [-0.1, -2.0, -0.3])
    return {
        f"L0.{i}": {"top": [_window([*tokens, f" #{i}"], [*values, 0.0])], "bottom": [bottom]}
        for i in range(n)
    }


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---- scores -------------------------------------------------------------------------------------


def test_score_is_the_probability_weighted_mean_over_number_tokens():
    score, mass = score_from_logprobs(_logprobs(n80=0.5, n60=0.25, n70=0.15, hello=0.1))
    assert mass == pytest.approx(0.9)
    assert score == pytest.approx((80 * 0.5 + 60 * 0.25 + 70 * 0.15) / 0.9)
    spaced, _ = score_from_logprobs({" 90": math.log(0.3), "101": math.log(0.7)})
    assert spaced == pytest.approx(90.0)  # " 90" counts, 101 is out of range


def test_less_than_a_quarter_of_the_mass_on_numbers_gives_no_score():
    assert score_from_logprobs(_logprobs(Sure=0.8, n50=0.2)) == (None, pytest.approx(0.2))


def test_parse_score_takes_the_first_integer_up_to_100():
    assert parse_score("I would say 85.") == 85.0
    assert parse_score("Relevance: 100") == 100.0
    assert parse_score("250 or 3.5") is None
    assert parse_score("no idea") is None


def test_end_to_end_logprob_score_matches_the_hand_computation(server, api_key):
    result = explain_and_score(_windows(1), DESCRIPTION, _backend(server.url), progress=False)
    first = result["L0.0"]
    assert first.explanation == EXPLANATION
    assert first.score == pytest.approx((80 * 0.5 + 60 * 0.25 + 70 * 0.15) / 0.9, abs=1e-3)
    assert (first.score_kind, first.number_mass) == ("logprob", pytest.approx(0.9))
    score_request = server.requests[1]
    assert (score_request["max_tokens"], score_request["top_logprobs"]) == (1, 20)
    assert score_request["messages"][2] == {"role": "assistant", "content": EXPLANATION}


def test_end_to_end_low_number_mass_gives_none(server, api_key):
    server.scores = [_logprobs(Sure=0.8, n50=0.2)]
    result = explain_and_score(_windows(1), DESCRIPTION, _backend(server.url), progress=False)
    assert (result["L0.0"].score, result["L0.0"].score_kind) == (None, None)


def test_endpoint_without_logprobs_gives_a_parsed_score_flagged_as_such(server, api_key):
    server.logprobs = False
    result = explain_and_score(_windows(2), DESCRIPTION, _backend(server.url), progress=False)
    assert [(r.score, r.score_kind) for r in result.values()] == [(85.0, "parsed")] * 2
    asked_logprobs = [bool(request.get("logprobs")) for request in server.requests]
    assert asked_logprobs == [False, True, False, False, False]  # asks once, then remembers


def test_endpoint_refusing_logprobs_is_asked_again_without(server, api_key):
    server.reject_logprobs = True
    result = explain_and_score(
        _windows(1), DESCRIPTION, _backend(server.url, max_retries=0), progress=False
    )
    assert (result["L0.0"].score, result["L0.0"].score_kind) == (85.0, "parsed")
    assert [bool(r.get("logprobs")) for r in server.requests] == [False, True, False, False]


# ---- prompts ------------------------------------------------------------------------------------


def test_mark_window_wraps_runs_of_strong_tokens():
    window = _window(["The", " nurse", " said", " she", " left"], [0.1, 0.9, 0.6, 1.0, 0.4])
    assert mark_window(window, 0.5) == "The <<nurse said she>> left"
    assert mark_window(window, 0.95) == "The nurse said <<she>> left"
    negative = _window(["A", " red", " car"], [-0.1, -2.0, -0.3])
    assert mark_window(negative, 1.0, sign=-1.0) == "A <<red>> car"


def test_explainer_sees_both_ends_for_pcs_and_the_top_only_for_sae_latents():
    windows = _windows(1)["L0.0"]
    pcs = explainer_prompt(windows, mark_fraction=0.5)
    assert "The <<nurse>> said <<she>> left" in pcs and "A <<red>> car" in pcs
    assert "most strongly negative" in pcs
    sae = explainer_prompt(windows, mark_fraction=0.2, sides=("top",))
    assert "negative" not in sae and "The <<nurse said she left>>" in sae  # 0.2 of the max


def test_relevance_question_carries_description_examples_and_pointers(server, api_key):
    explain_and_score(_windows(1), DESCRIPTION, _backend(server.url), progress=False)
    question = server.requests[1]["messages"][-1]["content"]
    assert DESCRIPTION.description in question
    assert DESCRIPTION.examples[0] in question and DESCRIPTION.pointers[0] in question
    assert DESCRIPTION.description not in server.requests[0]["messages"][-1]["content"]


# ---- retries and errors -------------------------------------------------------------------------


def test_rate_limits_are_retried_with_backoff(server, api_key):
    server.script = ["429", "429"]
    completion = _backend(server.url).complete([{"role": "user", "content": "hi"}], max_tokens=50)
    assert completion.text == EXPLANATION
    assert len(server.requests) == 3


def test_server_errors_are_retried(server, api_key):
    server.script = ["500"]
    completion = _backend(server.url).complete([{"role": "user", "content": "hi"}], max_tokens=50)
    assert completion.text == EXPLANATION and len(server.requests) == 2


def test_an_answer_slower_than_the_timeout_is_retried(server, api_key):
    server.script = [("delay", 1.5)]
    backend = _backend(server.url, timeout=0.5)
    completion = backend.complete([{"role": "user", "content": "hi"}], max_tokens=50)
    assert completion.text == EXPLANATION and len(server.requests) == 2


def test_rate_limit_that_never_ends_is_reported_after_the_retries(server, api_key):
    server.script = ["429"] * 10
    with pytest.raises(CaftError, match="still rate-limited after 3 attempts"):
        _backend(server.url, max_retries=2).complete(
            [{"role": "user", "content": "x"}], max_tokens=5
        )
    assert len(server.requests) == 3


def test_unknown_model_is_a_clear_error_without_retries(server, api_key):
    with pytest.raises(CaftError) as error:
        _backend(server.url, "no-such-model").complete(
            [{"role": "user", "content": "x"}], max_tokens=5
        )
    assert f"{server.url} does not know the model 'no-such-model'" in str(error.value)
    assert "does not exist" in str(error.value)
    assert len(server.requests) == 1


def test_unreachable_endpoint_fails_after_retries_quickly(api_key):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    started = time.perf_counter()
    with pytest.raises(CaftError, match="Cannot reach the chat endpoint") as error:
        _backend(url, max_retries=2).complete([{"role": "user", "content": "x"}], max_tokens=5)
    assert f"{url} after 3 attempts" in str(error.value)
    assert time.perf_counter() - started < 10


def test_missing_key_variable_is_named_before_any_request(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(CaftError, match=f"environment variable {KEY_ENV} is not set"):
        _backend(server.url)
    assert server.requests == []


def test_rejected_key_names_the_variable_but_never_prints_the_key(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-456")
    with pytest.raises(CaftError) as error:
        _backend(server.url).complete([{"role": "user", "content": "x"}], max_tokens=5)
    message = str(error.value)
    assert f"rejected the API key from ${KEY_ENV}" in message
    assert "sk-wrong-key-456" not in message and KEY not in message


# ---- cache, usage, concurrency, resuming --------------------------------------------------------


def test_cache_makes_a_rerun_send_no_requests(server, api_key, tmp_path):
    first = CachedBackend(_backend(server.url), tmp_path / "cache")
    results = explain_and_score(_windows(3), DESCRIPTION, first, progress=False)
    assert len(server.requests) == 6 and first.hits == 0
    again = CachedBackend(_backend(server.url), tmp_path / "cache")
    repeated = explain_and_score(_windows(3), DESCRIPTION, again, progress=False)
    assert len(server.requests) == 6 and again.hits == 6 and again.usage.requests == 0
    assert repeated == results


def test_token_usage_is_counted_and_saved(server, api_key, tmp_path):
    backend = _backend(server.url)
    explain_and_score(
        _windows(2), DESCRIPTION, backend, results_path=tmp_path / "r.json", progress=False
    )
    assert (backend.usage.requests, backend.usage.prompt_tokens) == (4, 44)
    assert backend.usage.total_tokens == 4 * 13
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["usage"]["prompt_tokens"] == 44 and saved["done"] == saved["total"] == 2


def test_concurrency_limit_caps_requests_in_flight(server, api_key):
    server.script = [("delay", 0.3)] * 8
    backend = _backend(server.url, concurrency=2)
    results = explain_and_score(_windows(4), DESCRIPTION, backend, progress=False)
    assert len(results) == 4 and len(server.requests) == 8
    assert server.max_in_flight == 2


def test_crash_keeps_finished_candidates_and_a_rerun_does_the_rest(server, api_key, tmp_path):
    server.drop_after = 5  # two candidates, then the third one's explanation, then nothing
    path, cache = tmp_path / "autointerp.json", tmp_path / "cache"
    backend = CachedBackend(_backend(server.url, max_retries=1), cache)
    with pytest.raises(CaftError, match="2 of 4 candidates are done") as error:
        explain_and_score(_windows(4), DESCRIPTION, backend, results_path=path, progress=False)
    assert "Cannot reach the chat endpoint" in str(error.value)
    assert [row["id"] for row in json.loads(path.read_text())["results"]] == ["L0.0", "L0.1"]
    fresh = ChatServer()
    try:
        backend = CachedBackend(_backend(fresh.url), cache)
        results = explain_and_score(
            _windows(4), DESCRIPTION, backend, results_path=path, progress=False
        )
    finally:
        fresh.close()
    assert len(fresh.requests) == 3  # L0.2's score, L0.3's explanation and score
    assert list(results) == ["L0.0", "L0.1", "L0.2", "L0.3"]
    assert json.loads(path.read_text())["done"] == 4


def test_saved_results_are_reused_only_for_the_same_description(server, api_key, tmp_path):
    path = tmp_path / "autointerp.json"
    for description in (DESCRIPTION, DESCRIPTION, replace(DESCRIPTION, description="Sports.")):
        explain_and_score(
            _windows(2), description, _backend(server.url), results_path=path, progress=False
        )
    assert len(server.requests) == 8  # 4, then none, then 4 again for the new description
    assert "Sports." in server.requests[-1]["messages"][-1]["content"]


# ---- selection and the description file ---------------------------------------------------------


def test_select_by_threshold_and_top_k_skip_missing_scores():
    scores = {"L0.0": 40.0, "L0.1": None, "L1.0": 90.0, "L1.1": 70.0}
    assert select_by_threshold(scores, 70) == ["L1.0", "L1.1"]
    assert select_top_k(scores, 2) == ["L1.0", "L1.1"]
    assert select_top_k(scores, 10) == ["L1.0", "L1.1", "L0.0"]
    with pytest.raises(CaftError, match="at least 1"):
        select_top_k(scores, 0)


def test_description_examples_and_pointers_are_optional(tmp_path):
    shipped = load_concept_description(default_contrast_path())
    assert shipped.examples and shipped.pointers and len(shipped.contrast_sets) == 2
    minimal = tmp_path / "minimal.json"
    minimal.write_text(json.dumps({"description": "Gender.", "examples": ["He left."]}))
    loaded = load_concept_description(minimal, require_contrast_sets=False)
    assert (loaded.examples, loaded.pointers, loaded.contrast_sets) == (["He left."], [], [])
    with pytest.raises(CaftError, match="contrast_sets"):
        load_concept_description(minimal)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"description": "Gender.", "pointers": "not a list"}))
    with pytest.raises(CaftError, match=f'{bad}: "pointers" must be a list of strings'):
        load_concept_description(bad, require_contrast_sets=False)


# ---- the local backend --------------------------------------------------------------------------


def test_local_backend_number_probabilities_match_a_direct_computation(tokenizer):
    model = tiny_llama(len(tokenizer))
    backend = LocalHFBackend(model, tokenizer, min_branch_prob=0.0)
    messages = [{"role": "user", "content": "Rate it from 0 to 100."}]
    answers = backend.complete(messages, max_tokens=1, top_logprobs=5).top_logprobs[0]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    digit = {d: tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)}

    def next_probs(extra):
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids + extra])).logits[0, -1].softmax(-1)

    def ends(extra):
        return 1 - next_probs(extra)[list(digit.values())].sum()

    seven = next_probs([])[digit[7]] * ends([digit[7]])
    seventy_three = next_probs([])[digit[7]] * next_probs([digit[7]])[digit[3]]
    seventy_three *= ends([digit[7], digit[3]])
    assert math.exp(answers["7"]) == pytest.approx(seven.item(), rel=1e-4)
    assert math.exp(answers["73"]) == pytest.approx(seventy_three.item(), rel=1e-4)
    assert sum(math.exp(v) for v in answers.values()) <= 1 + 1e-6


def test_local_backend_explains_and_scores_real_windows(tokenizer):
    model = tiny_llama(len(tokenizer))
    candidates = ConceptSet(
        {1: torch.randn(2, hidden_size(model), generator=torch.Generator().manual_seed(0))}
    )
    documents = ["The nurse said she would come.", "He fixed the car.", "Answer: A"]
    windows = collect_windows(model, tokenizer, documents, candidates, n_examples=2, progress=False)
    backend = LocalHFBackend(model, tokenizer)
    results = explain_and_score(
        windows, DESCRIPTION, backend, explanation_tokens=6, n_examples=2, progress=False
    )
    assert list(results) == ["L1.0", "L1.1"]
    for result in results.values():
        assert isinstance(result.explanation, str)
        assert result.score_kind in ("logprob", None)
        assert result.score is None or 0 <= result.score <= 100
    assert backend.usage.requests == 4 and backend.usage.prompt_tokens > 0


# ---- the command --------------------------------------------------------------------------------


def _cli_inputs(tmp_path, tokenizer) -> list[str]:
    model = tiny_llama(len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    generator = torch.Generator().manual_seed(0)
    raw = {layer: torch.randn(2, hidden_size(model), generator=generator) for layer in (0, 1)}
    ConceptSet(raw, provenance=Provenance(model="tiny", method="pca")).save(tmp_path / "cand")
    (tmp_path / "corpus.txt").write_text("The nurse said she would come.\n\nHe fixed the car.\n")
    (tmp_path / "concept.json").write_text(json.dumps({"description": "Gender of people."}))
    return [
        "autointerp", "--candidates", str(tmp_path / "cand"), "--model", str(tmp_path / "model"),
        "--corpus", str(tmp_path / "corpus.txt"), "--description", str(tmp_path / "concept.json"),
        "--api-key-env", KEY_ENV, "--api-model", "test-model", "--concurrency", "1",
        "--n-examples", "2", "--output-dir", str(tmp_path / "out"),
    ]  # fmt: skip


def test_cli_autointerp_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["autointerp", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--candidates", "--description", "--backend", "--base-url", "--api-model",
                   "--api-key-env", "--threshold", "--top-k", "--output-dir"):  # fmt: skip
        assert option in text


def test_cli_autointerp_end_to_end_writes_selection_with_explanations(
    server, api_key, tmp_path, tokenizer, capsys
):
    server.scores = [_logprobs(n90=1.0), _logprobs(n20=1.0), _logprobs(n75=1.0), _logprobs(n10=1.0)]
    argv = [*_cli_inputs(tmp_path, tokenizer), "--base-url", server.url]
    assert main(argv) == 0
    assert "Selected L0.0, L1.0" in capsys.readouterr().out
    selection = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert selection["selected"] == ["L0.0", "L1.0"]
    assert [row["score"] for row in selection["scores"]] == [90.0, 20.0, 75.0, 10.0]
    assert all(row["explanation"] == EXPLANATION for row in selection["scores"])
    assert [row["selected"] for row in selection["scores"]] == [True, False, True, False]
    assert ConceptSet.load(tmp_path / "out" / "selected").ids() == ["L0.0", "L1.0"]
    assert main(argv) == 0  # a re-run reuses the finished results
    assert "(0 requests, 0 tokens, 0 cached answers)" in capsys.readouterr().out
    (tmp_path / "out" / "autointerp.json").unlink()
    assert main(argv) == 0  # without them, the answers come from the cache
    assert "(0 requests, 0 tokens, 8 cached answers)" in capsys.readouterr().out
    assert len(server.requests) == 8


def test_cli_autointerp_top_k_and_nothing_passing(server, api_key, tmp_path, tokenizer, capsys):
    server.scores = [_logprobs(n30=1.0), _logprobs(n20=1.0), _logprobs(n50=1.0), _logprobs(n10=1.0)]
    argv = [*_cli_inputs(tmp_path, tokenizer), "--base-url", server.url]
    assert main(argv) == 2
    assert "No candidate passed (score >= 70)" in capsys.readouterr().err
    assert len(json.loads((tmp_path / "out" / "selection.json").read_text())["scores"]) == 4
    assert main([*argv, "--top-k", "1"]) == 0
    assert "Selected L1.0" in capsys.readouterr().out


def test_cli_autointerp_missing_key_fails_cleanly(tmp_path, tokenizer, monkeypatch, capsys):
    monkeypatch.delenv(KEY_ENV, raising=False)
    argv = [
        *_cli_inputs(tmp_path, tokenizer),
        "--base-url",
        f"http://127.0.0.1:{_closed_port()}/v1",
    ]
    capsys.readouterr()  # drop save_pretrained's progress output
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("caft: error: ") and KEY_ENV in err and "Traceback" not in err
