"""The ``fdfo`` command line.

    fdfo train [--config PRESET_OR_YAML] [--local] [--resume] [section.key=value ...]
    fdfo eval [--config PRESET | --checkpoint FOLDER] [--out DIR] [section.key=value ...]
    fdfo generate --checkpoint FOLDER --prompt TEXT [--prompt TEXT ...] [--seed N ...] [--out DIR]
    fdfo presets

``python -m cluster.cli train ...`` is the same thing, and is the ``ray job submit`` entrypoint.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from cluster.config import CONFIG_DIR, load_config, with_overrides


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fdfo", description="Finite Difference Flow Optimization on Ray")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="post-train a flow model with FDFO")
    t.add_argument("--config", default=None, help="preset name (see `fdfo presets`) or YAML path; default shapes")
    t.add_argument("--local", action="store_true", help="one process, no Ray (debug: breakpoint() works)")
    t.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    t.add_argument("--summary-json", default=None, help="write the final summary (ledger, metrics) to this file")
    t.add_argument("overrides", nargs="*", help="config overrides: section.key=value (e.g. train.lr=1e-4)")
    e = sub.add_parser("eval", help="held-out reward, unseen metrics, diversity; JSON + image grid")
    e.add_argument("--config", default=None, help="evaluate this preset's base model (when no --checkpoint)")
    e.add_argument("--checkpoint", default=None, help="checkpoint folder, or a run folder (its latest checkpoint)")
    e.add_argument("--out", default=None, help="output folder (default: the checkpoint's run folder / runs/<name>)")
    e.add_argument("--num-prompts", type=int, default=None)
    e.add_argument("--seeds", type=int, default=None, help="images per prompt")
    e.add_argument("overrides", nargs="*", help="config overrides, e.g. prompts.eval_source=builtin:shapes-train "
                   "(with --checkpoint: any but model.* and lora.*)")
    g = sub.add_parser("generate", help="images from a checkpoint for given prompts and seeds")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    g.add_argument("--seed", type=int, nargs="+", default=[0])
    g.add_argument("--out", default="generated")
    sub.add_parser("presets", help="list the config presets")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "presets":
        for path in sorted(CONFIG_DIR.glob("*.yaml")):
            first = path.read_text().splitlines()[0].lstrip("# ")
            print(f"{path.stem:20s} {first}")
        return 0
    if args.command == "eval":
        from cluster.evaluate import base_model, evaluate, load_policy

        if args.checkpoint:
            fixed = [o for o in args.overrides if o.split("=", 1)[0].split(".")[0] in ("model", "lora")]
            if fixed:
                raise ValueError(f"override {fixed[0]!r}: a checkpoint's model and LoRA settings describe its weights and "
                                 "cannot change; evaluate the base model with --config instead")
            model, cfg, folder = load_policy(args.checkpoint)
            cfg = with_overrides(cfg, args.overrides)     # e.g. prompts.eval_source=builtin:shapes-train
            out, tag = args.out or str(folder.parent.parent), f"eval_{folder.name}"
        else:
            (model, cfg), out, tag = base_model(args.config, args.overrides), args.out, "eval_base"
            out = out or f"{cfg.output_dir}/{cfg.name}"
        print(json.dumps(evaluate(model, cfg, out, args.num_prompts, args.seeds, tag=tag), indent=2))
        return 0
    if args.command == "generate":
        from PIL import Image

        from models.euler import generate_images
        from cluster.evaluate import load_policy

        model, cfg, _ = load_policy(args.checkpoint)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        prompts = [p for p in args.prompt for _ in args.seed]
        seeds = [s for _ in args.prompt for s in args.seed]
        images = generate_images(model, prompts, seeds, cfg.eval.num_steps or cfg.sampling.num_steps, cfg.sampling.guidance_scale)
        for k, (p, s, img) in enumerate(zip(prompts, seeds, images)):
            path = Path(args.out) / f"{k:03d}_seed{s}_{'_'.join(p.split())[:60]}.png"
            Image.fromarray(img).save(path)
            print(path)
        return 0
    overrides = list(args.overrides) + (["runtime.local=true"] if args.local else [])
    cfg = load_config(args.config, overrides)            # bad config fails here, before Ray starts
    # `ray job stop` sends SIGTERM: stop as Ctrl-C does (the drivers write a checkpoint and the accounting line)
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.default_int_handler(signum, frame))
    if cfg.runtime.local:
        from cluster.driver import run_local

        result = run_local(cfg, resume=args.resume)
    else:
        from cluster.runtime import run_ray

        result = run_ray(cfg, resume=args.resume)
    summary = {k: v for k, v in result.items() if k in ("ledger", "version", "final", "paths", "samplers")}
    print(json.dumps(summary, indent=2, default=str))
    for name, v in (result.get("final") or {}).get("heldout", {}).items():
        print(f"held-out {name[:-len('/mean')]}: before {v['before']:.4f} -> after {v['after']:.4f} ({v['gain']:+.4f})")
    for key in ("grid_before", "grid_after", "learning_curve", "checkpoint"):
        if (result.get("paths") or {}).get(key):
            print(f"{key.replace('_', ' ')}: {result['paths'][key]}")
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
