"""An HTTP reward server (``troupe rm serve``): OpenRLHF's remote reward-model protocol over a scorer.

Routes (protocol of OpenRLHF's ``openrlhf/cli/serve_rm.py``, spoken by its ``remote_rm_fn`` and by
troupe's built-in ``http`` reward, :class:`troupe.reward.http.HttpReward`):

* ``POST /get_reward``: body ``{"query": [str], "prompts"?: [...], "labels"?: [...]}``, each query a
  full prompt + response text; answer ``{"rewards": [float]}``, one per query, in order. A body
  that does not fit gets 422 with ``{"detail": "<what is wrong>"}``; a scoring error (or a
  non-finite reward) gets 500 with ``{"detail": "<the error>"}``. ``prompts`` and ``labels`` are
  checked for length and otherwise unused (a reward model reads only the text).
* ``GET /health``: ``{"status": "ok", ...}`` plus the ``info`` given to :func:`make_app`; never
  needs the token.

With a ``token``, every route but ``/health`` needs ``Authorization: Bearer <token>`` (401
otherwise). Endpoints are plain ``def``: FastAPI runs them in its thread pool, so a forward pass
does not block the event loop (:class:`troupe.reward.model.RewardModelScorer` serialises forwards).

Same text as in-cluster scoring: :func:`query_scorer` scores each query as
``reward_text(query, "", eos)`` (``troupe.reward.model``), i.e. exactly what
:class:`RewardModelScorer` scores for (prompt_text, completion) when ``query = prompt_text +
completion``, so a sample gets the same reward through HTTP and in the cluster.

This module imports fastapi (and pydantic); not torch, not Ray.
"""

from __future__ import annotations

import hmac
import math
from typing import Any, Callable, Mapping, Optional, Sequence

# at module level: FastAPI resolves the endpoints' (string) annotations in this module's globals
from fastapi import Body, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

__all__ = ["make_app", "query_scorer"]

ScoreTexts = Callable[[list[str]], Sequence[float]]


def query_scorer(scorer: Any) -> ScoreTexts:
    """``score_texts`` for :func:`make_app` from a :class:`troupe.reward.model.RewardModelScorer`.

    Each query (prompt text + response) is scored as ``scorer.texts([query], [""])``, i.e. with the
    tokenizer's EOS appended once, as in-cluster scoring does. For OpenRLHF clients, whose queries
    may carry padding or a final EOS already, leading pad-token strings and trailing pad/EOS-token
    strings are removed first (whole token strings, repeated), so EOS is not doubled. (A
    completion that itself ends with the literal EOS string therefore scores like one without it.)

    Args:
        scorer: an object with ``tokenizer``, ``texts(prompt_texts, completions)`` and
            ``score_texts(texts)`` (RewardModelScorer).
    Returns:
        ``f(queries: list[str]) -> list[float]`` ([N] rewards, normalised as the scorer is).
    """
    tok = scorer.tokenizer
    ends = [t for t in {getattr(tok, "eos_token", None), getattr(tok, "pad_token", None)} if t]
    pad = getattr(tok, "pad_token", None)

    def clean(q: str) -> str:
        changed = True
        while changed:
            changed = False
            for t in ends:
                if q.endswith(t):
                    q, changed = q[: -len(t)], True
        while pad and q.startswith(pad):
            q = q[len(pad):]
        return q

    def score(queries: list[str]) -> list[float]:
        cleaned = [clean(q) for q in queries]
        return list(scorer.score_texts(scorer.texts(cleaned, [""] * len(cleaned))))

    return score


def _bad_body(body: Any) -> Optional[str]:
    """Why a /get_reward body does not fit the protocol, or None."""
    if not isinstance(body, Mapping):
        return f"the body must be a JSON object, got {type(body).__name__}"
    if "query" not in body:
        return "the body has no 'query' (a list of prompt + response strings)"
    query = body["query"]
    if not isinstance(query, list):
        return f"'query' must be a list of strings, got {type(query).__name__}"
    for i, q in enumerate(query):
        if not isinstance(q, str):
            return f"'query'[{i}] must be a string, got {type(q).__name__}"
    for key in ("prompts", "labels"):
        v = body.get(key)
        if v is None:
            continue
        if not isinstance(v, list):
            return f"{key!r} must be a list or null, got {type(v).__name__}"
        if len(v) != len(query):
            return f"{key!r} has {len(v)} entries for {len(query)} queries"
    return None


def make_app(score_texts: ScoreTexts, token: Optional[str] = None,
             info: Optional[Mapping[str, Any]] = None) -> FastAPI:
    """The FastAPI app serving ``score_texts`` (routes in the module docstring).

    Args:
        score_texts: ``f(queries: list[str]) -> [N] floats``; e.g. ``query_scorer(RewardModelScorer(path))``.
            Called from FastAPI's worker threads, possibly concurrently.
        token: bearer token required on every route but ``/health``; None: no authentication.
        info: extra JSON-able fields for ``/health`` (e.g. the model path).
    Returns:
        A ``fastapi.FastAPI``.
    """
    app = FastAPI(title="troupe reward server", docs_url=None, redoc_url=None, openapi_url=None)
    health = {"status": "ok", **dict(info or {})}

    @app.exception_handler(RequestValidationError)
    def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        return JSONResponse({"detail": "invalid request body: " + "; ".join(parts)}, status_code=422)

    def check_token(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    def get_health() -> dict:
        return health

    @app.post("/get_reward", dependencies=[Depends(check_token)])
    def get_reward(body: Any = Body(...)) -> dict:
        why = _bad_body(body)
        if why:
            raise HTTPException(422, why)
        queries = list(body["query"])
        try:
            rewards = [float(r) for r in score_texts(queries)]
        except Exception as e:  # noqa: BLE001 - reported to the client
            raise HTTPException(500, f"scoring failed: {type(e).__name__}: {e}"[:2000]) from e
        if len(rewards) != len(queries):
            raise HTTPException(500, f"scoring failed: {len(rewards)} rewards for {len(queries)} queries")
        bad = [i for i, r in enumerate(rewards) if not math.isfinite(r)]
        if bad:
            raise HTTPException(500, f"scoring failed: non-finite reward for queries {bad[:10]}")
        return {"rewards": rewards}

    return app
