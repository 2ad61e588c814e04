"""The built-in ``http`` reward function: score by POSTing to a remote reward server.

Protocol: OpenRLHF's remote reward model (``openrlhf/utils/remote_rm_utils.py`` ``remote_rm_fn``
as client, ``openrlhf/cli/serve_rm.py`` as server), so a troupe run can use an OpenRLHF reward
server and ``troupe rm serve`` (:mod:`troupe.reward.server`) can serve OpenRLHF runs:

* request: ``POST <url>`` with JSON ``{"query": [prompt_text + completion, ...],
  "prompts": [prompt_text, ...], "labels": [answer or null, ...]}`` (one entry per sample);
* response: JSON ``{"rewards": [float, ...]}``, one per query. OpenRLHF's newer servers answer
  ``{"rewards": [...], "scores": [...], "extra_logs": {...}}``: the ``rewards`` list is used
  (``scores`` when there is no ``rewards``; a ``rewards`` that is itself such a dict is
  unwrapped); ``extra_logs`` is ignored.

Config (``reward.functions``)::

    - name: http
      options: {url: "http://127.0.0.1:5000/get_reward", timeout_s: 30, retries: 2, token_env: RM_TOKEN}

``requests`` is imported when a request is made, not when this module is imported.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping, Optional, Sequence

__all__ = ["HttpReward"]

_JSON_SCALARS = (str, int, float, bool, type(None))


def _label(v: Any) -> Any:
    """A label as JSON: scalars and lists/dicts as is, anything else as ``str``."""
    if isinstance(v, _JSON_SCALARS):
        return v
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        return str(v)


class HttpReward:
    """Reward function that asks a remote reward server (OpenRLHF protocol, module docstring).

    Args:
        url: the endpoint, e.g. ``http://127.0.0.1:5000/get_reward`` (http or https).
        timeout_s: seconds allowed to connect and, separately, between bytes of the answer
            (``requests``' connect/read timeouts), per attempt.
        retries: extra attempts after the first, made after a connection error, a timeout or an
            HTTP 5xx answer; never after a 4xx or a malformed answer.
        backoff_s: seconds slept before the first retry, doubled before each later one.
        token_env: name of an environment variable holding a bearer token, read once here and
            sent as ``Authorization: Bearer <token>``; None sends no header.
        batch_size: at most this many samples per request (a call makes ceil(N / batch_size)
            requests, one after the other); None sends the whole call in one request.
    Raises:
        ValueError: a bad option (empty or non-http url, negative timeout/retries/backoff,
            batch_size < 1), or ``token_env`` names a variable that is not set (names it).
    """

    def __init__(self, url: str, *, timeout_s: float = 30.0, retries: int = 2, backoff_s: float = 0.5,
                 token_env: Optional[str] = None, batch_size: Optional[int] = None) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url: expected an http:// or https:// address, got {url!r}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"timeout_s: expected a number > 0, got {timeout_s!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries: expected an integer >= 0, got {retries!r}")
        if isinstance(backoff_s, bool) or not isinstance(backoff_s, (int, float)) or not backoff_s >= 0:
            raise ValueError(f"backoff_s: expected a number >= 0, got {backoff_s!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size: expected an integer >= 1 or null, got {batch_size!r}")
        self.url, self.timeout_s, self.retries = url, float(timeout_s), retries
        self.backoff_s, self.batch_size, self.token_env = float(backoff_s), batch_size, token_env
        self._headers = {"Content-Type": "application/json"}
        if token_env is not None:
            token = os.environ.get(token_env)
            if not token:
                raise ValueError(f"token_env: environment variable {token_env!r} is not set (or empty)")
            self._headers["Authorization"] = f"Bearer {token}"
        self.__name__ = "http"  # thread names and messages in troupe.reward.scoring

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], *,
                 prompt_texts: Optional[Sequence[str]] = None, **columns: Any) -> list[Optional[float]]:
        """One reward per completion, from the server.

        Args:
            prompts: [N] raw questions (sent only when ``prompt_texts`` is None).
            completions: [N] texts, or TRL conversational lists of messages (last content used).
            prompt_texts: [N] the templated prompts the policy saw (the reward workers pass them).
            columns: data columns; ``answer`` ([N]) is sent as ``labels`` (nulls without it).
        Returns:
            [N] floats as the server sent them (a JSON null passes through as None: no score).
        Raises:
            ValueError: lengths differ; the server answered 4xx (status and the first 200
                characters of the body), or an answer that is not JSON, has no rewards list, has
                the wrong length, or a non-numeric entry (names the url).
            TimeoutError: the last attempt timed out (names the url and the attempts).
            ConnectionError: the last attempt could not connect or was cut off (names the url and
                the attempts).
            RuntimeError: the last attempt got an HTTP 5xx (status and body start).
        """
        from troupe.reward.registry import completion_text

        heads = list(prompt_texts) if prompt_texts is not None else [completion_text(p) for p in prompts]
        tails = [completion_text(c) for c in completions]
        if len(heads) != len(tails):
            raise ValueError(f"http reward: {len(heads)} prompts for {len(tails)} completions")
        answers = columns.get("answer")
        labels = [_label(a) for a in answers] if answers is not None else [None] * len(tails)
        if len(labels) != len(tails):
            raise ValueError(f"http reward: 'answer' has {len(labels)} entries for {len(tails)} completions")
        n = len(tails)
        step = self.batch_size or max(n, 1)
        out: list[Optional[float]] = []
        for i in range(0, n, step):
            h, t = heads[i:i + step], tails[i:i + step]
            payload = {"query": [str(p) + c for p, c in zip(h, t)], "prompts": [str(p) for p in h],
                       "labels": labels[i:i + step]}
            out += self._post(payload, len(t))
        return out

    def _post(self, payload: dict, n: int) -> list[Optional[float]]:
        """POST one request with bounded retries; the checked [n] rewards."""
        import requests

        attempts = self.retries + 1
        last: Optional[BaseException] = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                resp = requests.post(self.url, json=payload, headers=self._headers,
                                     timeout=(self.timeout_s, self.timeout_s))
            except requests.Timeout as e:
                last = TimeoutError(f"reward server {self.url}: no answer within {self.timeout_s:g} s "
                                    f"({attempts} attempt(s)): {e}")
                continue
            except requests.RequestException as e:  # refused, reset, dropped mid-answer
                last = ConnectionError(f"reward server {self.url}: {type(e).__name__} ({attempts} attempt(s)): {e}")
                continue
            if resp.status_code >= 500:
                last = RuntimeError(f"reward server {self.url}: HTTP {resp.status_code} ({attempts} attempt(s)): "
                                    f"{resp.text[:200]!r}")
                continue
            if resp.status_code >= 400:
                raise ValueError(f"reward server {self.url}: HTTP {resp.status_code}: {resp.text[:200]!r}")
            return self._rewards(resp, n)
        assert last is not None
        raise last

    def _rewards(self, resp: Any, n: int) -> list[Optional[float]]:
        """The rewards list of a 2xx answer, checked (ValueError naming the url otherwise)."""
        try:
            body = resp.json()
        except ValueError:
            raise ValueError(f"reward server {self.url}: answer is not JSON: {resp.text[:200]!r}") from None
        rewards = None
        if isinstance(body, Mapping):
            rewards = body.get("rewards", body.get("scores"))
            if isinstance(rewards, Mapping):  # {"rewards": {"rewards": [...], "scores": [...], "extra_logs": ...}}
                rewards = rewards.get("rewards", rewards.get("scores"))
        if not isinstance(rewards, list):
            raise ValueError(f"reward server {self.url}: answer has no 'rewards' (or 'scores') list: "
                             f"{json.dumps(body)[:200]}")
        if len(rewards) != n:
            raise ValueError(f"reward server {self.url}: {len(rewards)} rewards for {n} queries")
        out: list[Optional[float]] = []
        for i, r in enumerate(rewards):
            if r is None:
                out.append(None)
            elif isinstance(r, (int, float)) and not isinstance(r, bool):
                out.append(float(r))
            else:
                raise ValueError(f"reward server {self.url}: reward {i} is {r!r}, not a number")
        return out

    def __repr__(self) -> str:  # never shows the token
        auth = f", token_env={self.token_env!r}" if self.token_env else ""
        return f"HttpReward({self.url!r}, timeout_s={self.timeout_s:g}, retries={self.retries}{auth})"
