"""The reward server (``troupe rm serve``) and the built-in ``http`` reward function, on the CPU.

A tiny reward model is served by a real ``python -m troupe.cluster.rm_serve`` process; faults
(slow answers, garbage, 5xx, 4xx, a server that is down) come from a small stdlib HTTP server
started as a subprocess whose behaviour is chosen by the request path; it counts the requests it
saw per path (``GET /count/<path>``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import requests

from troupe.reward.http import HttpReward
from troupe.reward.registry import BUILTIN_FACTORIES, load_reward_function
from troupe.reward.scoring import score_batch

TOKEN_ENV = "TROUPE_TEST_RM_TOKEN"
TOKEN = "s3cret-token"

CORPUS = [f"Compute {a}+{b}. Answer in <answer></answer>.\n<think>{a}+{b}={a + b}</think><answer>{a + b}</answer>"
          for a in range(0, 60, 7) for b in range(0, 60, 9)]
PROMPT_TEXTS = ["Compute 7+9. Answer in <answer></answer>.\n", "Compute 14+18. Answer in <answer></answer>.\n",
                "Compute 21+27. Answer in <answer></answer>.\n"]
COMPLETIONS = ["<think>7+9=16</think><answer>16</answer>", "<answer>31</answer>",
               [{"role": "assistant", "content": "<think>21+27=48</think><answer>48</answer>"}]]
ANSWERS = ["16", "32", "48"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"server exited {proc.returncode}:\n{out}\n{err or ''}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout_s} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory) -> str:
    from troupe.learner.tiny_model import build_tiny_model
    from troupe.reward.model import load_reward_model, save_reward_model

    base = tmp_path_factory.mktemp("rm")
    lm = build_tiny_model(str(base / "lm"), CORPUS, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                          intermediate_size=64, max_position_embeddings=256, seed=0)
    model = load_reward_model(lm)
    return save_reward_model(model, str(base / "rm"), lm, stats={"mean": 0.5, "std": 2.0, "count": 10})


@pytest.fixture(scope="module")
def rm_server(rm_dir, tmp_path_factory):
    """(url, process) of a real ``troupe rm serve`` with a bearer token (stderr to a file: never blocks)."""
    port = _free_port()
    env = {**os.environ, TOKEN_ENV: TOKEN}
    with open(tmp_path_factory.mktemp("rm_serve") / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "troupe.cluster.rm_serve", rm_dir, "--port", str(port),
                                 "--token-env", TOKEN_ENV, "--batch-size", "2"],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, timeout_s=90)
        url = f"http://127.0.0.1:{port}/get_reward"
        assert proc.stdout.readline().strip() == f"serving reward model {rm_dir} on {url}"
        yield url, proc
    finally:
        _stop(proc)


FAKE_SERVER = textwrap.dedent('''
    import json, sys, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    counts, lock = {}, threading.Lock()

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def reply(self, status, body, ctype="application/json"):
            data = body.encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # the client gave up (timeout)

        def do_GET(self):
            if self.path == "/health":
                return self.reply(200, "{}")
            with lock:
                n = counts.get(self.path[len("/count"):], 0)
            self.reply(200, json.dumps({"count": n}))

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                counts[self.path] = counts.get(self.path, 0) + 1
                seen = counts[self.path]
            n, mode = len(body["query"]), self.path.split("/")[1]
            ok = [float(len(q)) for q in body["query"]]
            if mode == "sleep":
                time.sleep(3)
                return self.reply(200, json.dumps({"rewards": ok}))
            if mode == "flaky":
                return self.reply(503, "busy") if seen == 1 else self.reply(200, json.dumps({"rewards": ok}))
            if mode == "always500":
                return self.reply(500, "boom")
            if mode == "status400":
                return self.reply(400, "bad request: " + "x" * 500, "text/plain")
            if mode == "notjson":
                return self.reply(200, "<html>hello</html>", "text/html")
            if mode == "short":
                return self.reply(200, json.dumps({"rewards": ok[:-1]}))
            if mode == "strings":
                return self.reply(200, json.dumps({"rewards": ["good"] * n}))
            if mode == "nokey":
                return self.reply(200, json.dumps({"values": ok}))
            if mode == "scores":
                return self.reply(200, json.dumps({"scores": ok}))
            if mode == "openrlhf":
                return self.reply(200, json.dumps({"rewards": ok, "scores": [0.0] * n, "extra_logs": {"x": ok}}))
            if mode == "echo":
                return self.reply(200, json.dumps({"rewards": ok, "echo": body}))
            self.reply(404, "no such mode")

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
''')


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """Base url of the fault-injecting stub server; ``count(path)`` -> POSTs it saw on ``path``."""
    script = tmp_path_factory.mktemp("fake") / "fake_rm.py"
    script.write_text(FAKE_SERVER)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(script), str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(base + "/health", proc, timeout_s=30)
        yield base
    finally:
        _stop(proc)


def _count(base: str, path: str) -> int:
    return requests.get(f"{base}/count{path}", timeout=5).json()["count"]


def _path(mode: str) -> str:
    return f"/{mode}/{uuid.uuid4().hex[:8]}"


def _call(fn, n: int = 2):
    return fn(PROMPT_TEXTS[:n], COMPLETIONS[:n], answer=ANSWERS[:n])


# --- the real reward-model server ---------------------------------------------------------------


def test_http_rewards_equal_in_cluster_rewards(rm_dir, rm_server, monkeypatch):
    from troupe.reward.model import RewardModelScorer

    url, _ = rm_server
    scorer = RewardModelScorer(rm_dir)
    assert scorer.normalized
    raw_questions = ["q1", "q2", "q3"]  # ignored when prompt_texts is given
    local = scorer(raw_questions, COMPLETIONS, prompt_texts=PROMPT_TEXTS, answer=ANSWERS)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    for batch_size in (None, 2):
        fn = load_reward_function("http", {"url": url, "token_env": TOKEN_ENV, "batch_size": batch_size})
        remote = fn(raw_questions, COMPLETIONS, prompt_texts=PROMPT_TEXTS, answer=ANSWERS)
        assert remote == pytest.approx(local, abs=1e-5)
    assert len(set(round(r, 6) for r in local)) == 3  # the samples really differ
    # OpenRLHF clients may send a query that already ends with EOS: not doubled
    eos = scorer.tokenizer.eos_token
    query = PROMPT_TEXTS[0] + COMPLETIONS[0]
    r = requests.post(url, json={"query": [query + eos]}, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert r.json()["rewards"] == pytest.approx(local[:1], abs=1e-5)


def test_server_enforces_the_bearer_token(rm_server):
    url, _ = rm_server
    body = {"query": [PROMPT_TEXTS[0] + COMPLETIONS[0]]}
    assert requests.post(url, json=body, timeout=30).status_code == 401
    bad = requests.post(url, json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert bad.status_code == 401 and "bearer token" in bad.json()["detail"]
    good = requests.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert good.status_code == 200 and len(good.json()["rewards"]) == 1
    health = requests.get(url.replace("/get_reward", "/health"), timeout=30)  # no token needed
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["normalized"] is True
    # the client without the token: a 4xx is not retried, a clear ValueError
    with pytest.raises(ValueError, match="HTTP 401"):
        _call(HttpReward(url, retries=3, backoff_s=5.0))
    # bad bodies: 422 with what is wrong
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = requests.post(url, json={"query": "not a list"}, headers=auth, timeout=30)
    assert r.status_code == 422 and "'query' must be a list" in r.json()["detail"]
    r = requests.post(url, json={"query": ["a"], "prompts": ["a", "b"]}, headers=auth, timeout=30)
    assert r.status_code == 422 and "'prompts' has 2 entries for 1 queries" in r.json()["detail"]


def test_score_batch_with_the_http_reward(rm_dir, rm_server, monkeypatch):
    from troupe.reward.model import RewardModelScorer

    url, _ = rm_server
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    fn = load_reward_function("http", {"url": url, "token_env": TOKEN_ENV})
    res = score_batch([("rm_http", fn, 1.0)], PROMPT_TEXTS, COMPLETIONS, {"answer": ANSWERS},
                      timeout_s=30, on_failure="zero")
    assert res.failures == {} and res.errors["rm_http"] == [None] * 3
    expected = RewardModelScorer(rm_dir)(PROMPT_TEXTS, COMPLETIONS)  # prompts stand in for prompt_texts
    assert res.rewards == pytest.approx(expected, abs=1e-5)


def test_rm_serve_refuses_a_bad_checkpoint(tmp_path, capsys, monkeypatch):
    from troupe.cluster.rm_serve import main

    assert main([str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "cannot load" in capsys.readouterr().err
    monkeypatch.delenv("TROUPE_NO_SUCH_VAR", raising=False)
    assert main([str(tmp_path / "empty"), "--token-env", "TROUPE_NO_SUCH_VAR"]) == 2
    assert "TROUPE_NO_SUCH_VAR" in capsys.readouterr().err


# --- the client against injected faults ---------------------------------------------------------


def test_request_body_follows_the_openrlhf_protocol(fake, monkeypatch):
    path = _path("echo")
    assert _call(HttpReward(fake + path), 3) == [float(len(p) + len(c if isinstance(c, str) else c[-1]["content"]))
                                                 for p, c in zip(PROMPT_TEXTS, COMPLETIONS)]
    sent = []
    real_post = requests.post

    def spy(url, json=None, **kw):
        sent.append(json)
        return real_post(url, json=json, **kw)

    monkeypatch.setattr(requests, "post", spy)
    # no prompt_texts: the prompts are used; no answer column: null labels; batch_size splits
    HttpReward(fake + path, batch_size=2)(["raw q", "q2", "q3"], ["resp", "r2", [{"content": "r3"}]])
    assert sent == [{"query": ["raw qresp", "q2r2"], "prompts": ["raw q", "q2"], "labels": [None, None]},
                    {"query": ["q3r3"], "prompts": ["q3"], "labels": [None]}]
    sent.clear()
    HttpReward(fake + path)(["p"], ["c"], prompt_texts=["<t>p</t>"], answer=["7"])
    assert sent == [{"query": ["<t>p</t>c"], "prompts": ["<t>p</t>"], "labels": ["7"]}]
    assert BUILTIN_FACTORIES["http"] is HttpReward


def test_scores_and_openrlhf_response_forms_are_accepted(fake):
    assert _call(HttpReward(fake + _path("scores"))) == _call(HttpReward(fake + _path("openrlhf")))


def test_timeout_raises_after_all_attempts_and_counts_as_failure(fake):
    path = _path("sleep")
    fn = HttpReward(fake + path, timeout_s=0.3, retries=2, backoff_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"3 attempt\(s\)") as e:
        _call(fn)
    assert fake + path in str(e.value)
    assert time.monotonic() - t0 < 2.5
    assert _count(fake, path) == 3
    fn = HttpReward(fake + _path("sleep"), timeout_s=0.3, retries=1, backoff_s=0.05)
    res = score_batch([("rm_http", fn, 1.0)], PROMPT_TEXTS[:2], COMPLETIONS[:2], {"answer": ANSWERS[:2]},
                      timeout_s=10, on_failure="zero")
    assert res.rewards == [0.0, 0.0]
    assert res.errors["rm_http"] == ["timeout", "timeout"] and res.failures == {"timeout": 2}


@pytest.mark.parametrize("mode,match", [
    ("notjson", "not JSON"),
    ("short", "1 rewards for 2 queries"),
    ("strings", "reward 0 is 'good', not a number"),
    ("nokey", "no 'rewards'"),
])
def test_garbage_answers_are_clear_errors_and_failures(fake, mode, match):
    path = _path(mode)
    with pytest.raises(ValueError, match=match) as e:
        _call(HttpReward(fake + path, retries=2, backoff_s=0.05))
    assert fake + path in str(e.value)
    assert _count(fake, path) == 1  # a malformed answer is not retried
    res = score_batch([("rm_http", HttpReward(fake + path, retries=0), 1.0)], PROMPT_TEXTS[:2], COMPLETIONS[:2],
                      {"answer": ANSWERS[:2]}, timeout_s=10, on_failure="exclude")
    assert res.rewards == [None, None]
    # the batch call fails, then each sample alone (the short answer: 0 rewards for 1 query)
    assert res.errors["rm_http"] == ["exception", "exception"] and res.failures == {"exception": 2}
    assert "ValueError: reward server" in res.messages["rm_http"]


def test_5xx_is_retried_4xx_is_not(fake):
    path = _path("flaky")
    assert _call(HttpReward(fake + path, retries=1, backoff_s=0.05)) == [
        float(len(PROMPT_TEXTS[i] + COMPLETIONS[i])) for i in range(2)]
    assert _count(fake, path) == 2
    path = _path("always500")
    with pytest.raises(RuntimeError, match="HTTP 500"):
        _call(HttpReward(fake + path, retries=2, backoff_s=0.01))
    assert _count(fake, path) == 3
    path = _path("status400")
    with pytest.raises(ValueError, match="HTTP 400") as e:
        _call(HttpReward(fake + path, retries=3, backoff_s=1.0))
    assert _count(fake, path) == 1 and len(str(e.value)) < 400  # body cut to 200 characters


def test_a_server_that_is_down_fails_quickly():
    url = f"http://127.0.0.1:{_free_port()}/get_reward"
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=r"3 attempt\(s\)"):
        _call(HttpReward(url, retries=2, backoff_s=0.05, timeout_s=2))
    assert time.monotonic() - t0 < 2.0
    res = score_batch([("rm_http", HttpReward(url, retries=1, backoff_s=0.01), 1.0)], PROMPT_TEXTS[:2],
                      COMPLETIONS[:2], {"answer": ANSWERS[:2]}, timeout_s=10, on_failure="zero")
    assert res.failures == {"exception": 2}


# --- options and the in-process app -------------------------------------------------------------


def test_options_are_checked(monkeypatch):
    with pytest.raises(ValueError, match=r"reward function 'http': options: missing 'url'"):
        load_reward_function("http")
    with pytest.raises(ValueError, match=r"reward function 'http': options: unknown 'urll'"):
        load_reward_function("http", {"urll": "http://x"})
    with pytest.raises(ValueError, match=r"reward function 'http': options: .*retries"):
        load_reward_function("http", {"url": "http://x", "retries": -1})
    monkeypatch.delenv("TROUPE_NO_SUCH_VAR", raising=False)
    with pytest.raises(ValueError, match="TROUPE_NO_SUCH_VAR"):
        load_reward_function("http", {"url": "http://x", "token_env": "TROUPE_NO_SUCH_VAR"})
    with pytest.raises(ValueError, match="reward function 'accuracy' takes no options"):
        load_reward_function("accuracy", {"url": "http://x"})
    assert load_reward_function("accuracy", {}) is load_reward_function("accuracy")
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    fn = load_reward_function("http", {"url": "http://x/get_reward", "token_env": TOKEN_ENV})
    assert isinstance(fn, HttpReward) and TOKEN not in repr(fn)


def test_app_reports_scoring_errors_as_500():
    from fastapi.testclient import TestClient

    from troupe.reward.server import make_app

    def broken(queries):
        raise RuntimeError("model on fire")

    client = TestClient(make_app(broken))
    r = client.post("/get_reward", json={"query": ["a"]})
    assert r.status_code == 500 and "model on fire" in r.json()["detail"]
    client = TestClient(make_app(lambda qs: [float("nan")] * len(qs)))
    r = client.post("/get_reward", json={"query": ["a"]})
    assert r.status_code == 500 and "non-finite" in r.json()["detail"]
    client = TestClient(make_app(lambda qs: [1.0] * len(qs)))
    assert client.post("/get_reward", json={"query": []}).json() == {"rewards": []}
    r = client.post("/get_reward", content=b"not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"].startswith("invalid request body")
    r = client.post("/get_reward", json={"queries": ["a"]})
    assert r.status_code == 422 and "no 'query'" in r.json()["detail"]
