"""``troupe rm serve CKPT``: serve a reward model over HTTP (OpenRLHF remote reward-model protocol).

Usage::

    troupe rm serve CKPT [--host 127.0.0.1] [--port 5000] [--token-env VAR] [--batch-size 16]
                         [--max-length 1024] [--no-normalize] [--device cpu] [--dtype float32]
    python -m troupe.cluster.rm_serve CKPT ...        # the same

Loads ``CKPT`` (a ``troupe rm train`` folder or any HF ``*ForSequenceClassification`` with
num_labels=1) into :class:`troupe.reward.model.RewardModelScorer`, prints
``serving reward model CKPT on http://HOST:PORT/get_reward`` and serves
:func:`troupe.reward.server.make_app` with uvicorn until interrupted. Runs point the built-in
``http`` reward function at that address (``options: {url: ..., token_env: VAR}``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="troupe rm serve", description="Serve a reward model over HTTP "
                                "(POST /get_reward {'query': [prompt+response]} -> {'rewards': [float]}).")
    p.add_argument("ckpt", help="reward-model folder (troupe rm train output, or an HF sequence-classification model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000, help="TCP port (default 5000)")
    p.add_argument("--token-env", default=None, metavar="VAR",
                   help="environment variable holding a bearer token that clients must send")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward (default 16)")
    p.add_argument("--max-length", type=int, default=1024, help="texts keep their last this many tokens (default 1024)")
    p.add_argument("--no-normalize", action="store_true",
                   help="serve the raw head value, not (r - mean) / std with the folder's reward_stats.json")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """Run the server; returns the exit status.

    Returns:
        0 after a clean shutdown; 2 for a bad argument, an unset ``--token-env`` variable or a
        checkpoint that cannot be loaded (one line on stderr).
    """
    args = _parser().parse_args(argv)
    if not 0 < args.port < 65536 or args.batch_size < 1 or args.max_length < 1:
        print("troupe rm serve: --port must be 1..65535, --batch-size and --max-length >= 1", file=sys.stderr)
        return 2
    token = None
    if args.token_env is not None:
        token = os.environ.get(args.token_env)
        if not token:
            print(f"troupe rm serve: --token-env: environment variable {args.token_env!r} is not set (or empty)",
                  file=sys.stderr)
            return 2
    if not os.path.isdir(args.ckpt):
        print(f"troupe rm serve: {args.ckpt!r} is not a folder (expected a reward-model checkpoint)", file=sys.stderr)
        return 2

    from troupe.reward.model import RewardModelScorer
    from troupe.reward.server import make_app, query_scorer

    try:
        scorer = RewardModelScorer(args.ckpt, batch_size=args.batch_size, normalize=not args.no_normalize,
                                   max_length=args.max_length, device=args.device, dtype=args.dtype)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"troupe rm serve: cannot load {args.ckpt!r}: {e}", file=sys.stderr)
        return 2
    app = make_app(query_scorer(scorer), token=token,
                   info={"model": os.path.abspath(args.ckpt), "normalized": scorer.normalized})

    import uvicorn

    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving reward model {args.ckpt} on http://{host}:{args.port}/get_reward", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
