"""``troupe rm``: reward models.

    troupe rm train CONFIG.yaml [key.sub=value ...] [--address RAY_ADDRESS]
        Bradley-Terry reward model on DeepSpeed ZeRO ranks (troupe.cluster.rm_train)
    troupe rm pairs RUN_CONFIG.yaml [key.sub=value ...] --model DIR --out PAIRS.jsonl ...
        preference pairs from a policy's own samples, ranked by the run's reward functions
        (troupe.cluster.rm_pairs)
    troupe rm serve MODEL_DIR [--host 127.0.0.1] [--port 5000] [--token-env VAR] ...
        an HTTP reward server speaking OpenRLHF's remote reward-model protocol (troupe.cluster.rm_serve)

Exit status: 0 on success, 2 on a bad config, override or data row (the message names the key,
file and line), 1 on a failure during training (the message names what failed).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]

_USAGE = __doc__.split("\n\n")[1]


def _train(argv: list[str]) -> int:
    from troupe.configs.schema import ConfigError, load_rm_config
    from troupe.rollout.data import DataError

    p = argparse.ArgumentParser(prog="troupe rm train", description="train a Bradley-Terry reward model")
    p.add_argument("config", help="YAML reward-model config (troupe.configs.schema.RewardModelTrainConfig)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=2")
    p.add_argument("--address", default=None, help="Ray cluster address (default: an embedded local cluster)")
    args = p.parse_args(argv)
    try:
        cfg = load_rm_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"troupe rm train: {e}", file=sys.stderr)
        return 2
    from troupe.cluster.rm_train import train_reward_model
    from troupe.core.rpc import ActorFailed, RemoteTimeout

    try:
        summary = train_reward_model(cfg, args.address, log=lambda m: print(m, flush=True))
    except (DataError, ValueError) as e:
        print(f"troupe rm train: {e}", file=sys.stderr)
        return 2
    except (ActorFailed, RemoteTimeout, TimeoutError, ConnectionError) as e:
        print(f"troupe rm train: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("troupe rm train: stopped", file=sys.stderr)
        return 130
    last = summary["epochs"][-1]
    print(f"done: held-out pairwise accuracy {summary['epochs'][0].get('eval/accuracy', float('nan')):.3f} -> "
          f"{last.get('eval/accuracy', float('nan')):.3f} in {summary['seconds']:.0f} s; model {summary['model']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``troupe rm SUBCOMMAND ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage:\n" + _USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        return _train(rest)
    if cmd == "pairs":
        from troupe.cluster.rm_pairs import main as pairs_main

        return pairs_main(rest)
    if cmd == "serve":
        from troupe.cluster.rm_serve import main as serve_main

        return serve_main(rest)
    print(f"troupe rm: unknown subcommand {cmd!r}\nusage:\n{_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
