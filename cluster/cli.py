"""The ``fdfo`` command line.

    fdfo train [--config PRESET_OR_YAML] [--local] [--resume] [section.key=value ...]
    fdfo presets

``python -m cluster.cli train ...`` is the same thing, and is the ``ray job submit`` entrypoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cluster.config import CONFIG_DIR, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fdfo", description="Finite Difference Flow Optimization on Ray")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="post-train a flow model with FDFO")
    t.add_argument("--config", default=None, help="preset name (see `fdfo presets`) or YAML path; default tiny-cpu")
    t.add_argument("--local", action="store_true", help="one process, no Ray (debug: breakpoint() works)")
    t.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    t.add_argument("--summary-json", default=None, help="write the final summary (ledger, metrics) to this file")
    t.add_argument("overrides", nargs="*", help="config overrides: section.key=value (e.g. train.lr=1e-4)")
    sub.add_parser("presets", help="list the config presets")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "presets":
        for path in sorted(CONFIG_DIR.glob("*.yaml")):
            first = path.read_text().splitlines()[0].lstrip("# ")
            print(f"{path.stem:20s} {first}")
        return 0
    overrides = list(args.overrides) + (["runtime.local=true"] if args.local else [])
    cfg = load_config(args.config, overrides)            # bad config fails here, before Ray starts
    if cfg.runtime.local:
        from cluster.driver import run_local

        result = run_local(cfg, resume=args.resume)
    else:
        from cluster.runtime import run_ray

        result = run_ray(cfg, resume=args.resume)
    summary = {k: v for k, v in result.items() if k in ("ledger", "version", "final", "paths", "samplers")}
    print(json.dumps(summary, indent=2, default=str))
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
