"""The recipes side by side: val loss against tokens, from the same seed on the same data, each
configuration with the same number of LR tries, the tries alternating between configurations so that a
load change on the shared machine falls on all of them.

The four configurations separate the architecture's gain from the optimizer's (and schedule's):

    classic        --arch gpt2   AdamW at --max-lr, cosine            (GPT-2's, gptctl's default)
    gpt2-muon      --arch gpt2   Muon at --muon-lr, AdamW part at the classic try's --max-lr, wsd
    modern-adamw   --arch modern AdamW at --max-lr for every parameter, cosine
    speedrun       --recipe speedrun (modern, Muon, wsd, its own embedding/head/scalar LRs), every
                   one of its LRs times the try's factor

Data: ../shared/data/shakespeare-works/ (42 plays and poems) prepared by `gptctl data prepare`, with
whole plays held out as val (--val-plays: they come first and --val-tokens is exactly their tokens).
Every run is a real `gptctl pretrain` (same --seed; the batch of a step is a function of the step: the
same data order). The figure: tokens each configuration's best run needs to reach the classic best
run's final val loss (linear between evals), and the ratio to classic's; plus a PNG of the best runs
from `gptctl runs plot` (needs matplotlib).

    python benchmarks/recipes.py --model tiny --seq-len 128 --batch-size 8 --total-batch-size 1024 \
        --steps 200 --warmup-steps 10 --eval-interval 20 --eval-steps 8 \
        --classic-lrs 1e-3,3e-3,6e-3 --muon-lrs 0.01,0.02,0.04 --modern-lrs 1e-3,3e-3,6e-3 \
        --speedrun-scales 0.5,1,2 --out benchmarks/recipes
"""

import argparse
import json
from pathlib import Path

from _common import (REPO, gptctl, print_footer, print_header, print_table, scratch_dir)

WORKS = REPO.parent / "shared" / "data" / "shakespeare-works"


def prepare(workdir: Path, val_plays: list[str]) -> Path:
    """The works as shards, the val plays first and exactly their tokens as val."""
    from gptctl.data.tokenizer import get_encoding

    files = sorted(WORKS.glob("*.txt"))
    val = [f for f in files if f.stem.removesuffix("_gut") in val_plays]
    if len(val) != len(val_plays):
        raise SystemExit(f"--val-plays: found {[f.stem for f in val]} of {val_plays} in {WORKS}")
    enc = get_encoding()
    val_tokens = sum(len(enc.encode_ordinary(f.read_text())) + 1 for f in val)  # each document ends with EOT
    root = workdir / "works"
    inputs = [arg for f in val + [f for f in files if f not in val] for arg in ("--input", str(f))]
    gptctl("data", "prepare", *inputs, "--data-root", str(root), "--val-tokens", str(val_tokens),
           home=workdir / "home")
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["val_tokens"] == val_tokens, manifest  # the val split is exactly the held-out plays
    print(f"data: {manifest['train_tokens']:,} train tokens, {val_tokens:,} val tokens ({', '.join(val_plays)})")
    return root


def train(home: Path, data: Path, name: str, args, extra: list[str]) -> list[tuple[int, float]]:
    """One run; its (tokens seen, val loss) at every eval."""
    gptctl("pretrain", "--model", args.model, "--data-root", str(data), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size), "--total-batch-size", str(args.total_batch_size),
           "--max-steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
           "--eval-interval", str(args.eval_interval), "--eval-steps", str(args.eval_steps),
           "--checkpoint-interval", str(args.steps), "--keep-last-n-checkpoints", "1", "--device", "cpu",
           "--run-name", name, *shape_options(args.shape), *extra, home=home)
    shown = json.loads(gptctl("runs", "show", name, "--json", home=home).stdout)
    return [(m["tokens_seen"], m["val_loss"]) for m in shown["metrics"] if m["val_loss"] is not None]


def shape_options(shape: str | None) -> list[str]:
    """--shape LAYERS,HEADS,WIDTH: the preset's shape replaced (a larger shape than the presets)."""
    if not shape:
        return []
    layers, heads, width = shape.split(",")
    return ["--n-layer", layers, "--n-head", heads, "--n-embd", width]


def muon_options(muon_lr: float, adamw_lr: float, scheduler: str) -> list[str]:
    return ["--optimizer", "muon", "--muon-lr", str(muon_lr), "--max-lr", str(adamw_lr),
            "--lr-scheduler", scheduler]


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Tokens at which the val loss first reaches `target`, linear between evals; None if it never does."""
    previous = None
    for tokens, loss in curve:
        if loss <= target:
            if previous is None:
                return float(tokens)
            (t0, l0) = previous
            return t0 + (tokens - t0) * (l0 - target) / (l0 - loss)
        previous = (tokens, loss)
    return None


CONFIGS = ("classic", "gpt2-muon", "modern-adamw", "speedrun")


def options(config: str, i: int, sweeps: dict[str, list[float]]) -> tuple[str, list[str]]:
    """(run name, options) of try `i` of `config`."""
    from gptctl.presets import RECIPES

    if config == "classic":
        lr = sweeps["classic"][i]
        return f"classic-{lr:g}", ["--max-lr", str(lr)]
    if config == "gpt2-muon":
        lr = sweeps["gpt2-muon"][i]
        return f"gpt2-muon-{lr:g}", muon_options(lr, sweeps["classic"][i], "wsd")
    if config == "modern-adamw":
        lr = sweeps["modern-adamw"][i]
        return f"modern-adamw-{lr:g}", ["--arch", "modern", "--max-lr", str(lr)]
    factor = sweeps["speedrun"][i]
    lrs = {k: v * factor for k, v in RECIPES["speedrun"].items() if k.endswith("_lr")}
    return f"speedrun-x{factor:g}", ["--recipe", "speedrun", *(a for k, v in lrs.items()
                                                                for a in (f"--{k.replace('_', '-')}", f"{v:g}"))]


TRAINING = ("model", "seq_len", "batch_size", "total_batch_size", "steps", "warmup_steps", "eval_interval",
            "eval_steps", "val_plays")


def reuse(args) -> dict[str, dict[str, list]]:
    """The curves of an earlier invocation with the same training options, by configuration."""
    earlier = json.loads(args.reuse.read_text())
    differ = [k for k in TRAINING if earlier["args"][k] != str(getattr(args, k))]
    if differ:
        raise SystemExit(f"--reuse: {args.reuse} was trained with other {', '.join(differ)}")
    return {c: {n: [tuple(p) for p in curve] for n, curve in runs.items()} for c, runs in earlier["curves"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--shape", help="LAYERS,HEADS,WIDTH instead of the preset's (e.g. 8,8,384)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--total-batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--eval-interval", type=int, default=20)
    parser.add_argument("--eval-steps", type=int, default=8)
    parser.add_argument("--classic-lrs", default="1e-3,3e-3,6e-3", help="--max-lr values tried for classic")
    parser.add_argument("--muon-lrs", default="0.01,0.02,0.04", help="--muon-lr values tried for gpt2-muon")
    parser.add_argument("--modern-lrs", default="1e-3,3e-3,6e-3", help="--max-lr values tried for modern-adamw")
    parser.add_argument("--speedrun-scales", default="0.5,1,2", help="factors on every LR of --recipe speedrun")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="which of " + ", ".join(CONFIGS))
    parser.add_argument("--val-plays", default="hamlet,macbeth,tempest")
    parser.add_argument("--data-root", type=Path, default=None, help="An already prepared data root.")
    parser.add_argument("--out", type=Path, default=None, help="Where to write results.json and recipes.png.")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="An earlier results.json with the same training options: its configurations are "
                             "read from it, only the others are trained (the PNG shows the new runs).")
    args = parser.parse_args()
    sweeps = {"classic": args.classic_lrs, "gpt2-muon": args.muon_lrs, "modern-adamw": args.modern_lrs,
              "speedrun": args.speedrun_scales}
    sweeps = {k: [float(x) for x in v.split(",")] for k, v in sweeps.items()}
    configs = [c for c in args.configs.split(",") if c]
    earlier = reuse(args) if args.reuse else {}
    for config, curves_of in earlier.items():
        sweeps[config] = [float(name.rsplit("-", 1)[-1].lstrip("x")) for name in curves_of]  # "speedrun-x0.5"
    configs = [*earlier, *(c for c in configs if c not in earlier)]
    if "classic" not in configs or set(configs) - set(CONFIGS):
        raise SystemExit(f"--configs: classic (the target) and any of {', '.join(CONFIGS)}")
    if len({len(sweeps[c]) for c in configs}) != 1:
        raise SystemExit("every configuration gets the same number of LR tries")
    print_header("recipes", "python benchmarks/recipes.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None))

    with scratch_dir() as work:
        data = args.data_root or prepare(work, args.val_plays.split(","))
        home = work / "home"
        curves: dict[str, dict[str, list]] = {c: earlier.get(c, {}) for c in configs}
        for i in range(len(sweeps["classic"])):
            for config in (c for c in configs if c not in earlier):
                name, extra = options(config, i, sweeps)
                curves[config][name] = train(home, data, name, args, extra)
                print(f"{name}: final val loss {curves[config][name][-1][1]:.4f}", flush=True)
        best = {c: min(curves[c], key=lambda n: curves[c][n][-1][1]) for c in configs}
        target = curves["classic"][best["classic"]][-1][1]
        tokens = {c: tokens_to_reach(curves[c][best[c]], target) for c in configs}
        print_table("final val loss of every try", ["run", "final val loss", "tokens"],
                    [[n, curve[-1][1], curve[-1][0]] for c in configs for n, curve in curves[c].items()])
        ratios = {c: tokens["classic"] / tokens[c] if tokens[c] else None for c in configs}
        print_table(f"tokens to reach the classic best's final val loss {target:.4f}",
                    ["configuration", "best run", "final val loss", "tokens", "classic / it"],
                    [[c, best[c], curves[c][best[c]][-1][1], tokens[c] or "not reached",
                      f"{ratios[c]:.2f}" if ratios[c] else "-"] for c in configs])
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.json").write_text(json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "curves": curves, "best": best,
                 "target": target, "tokens": tokens, "ratios": ratios}, indent=2))
            gptctl("runs", "plot", *(best[c] for c in configs if c not in earlier), "--x", "tokens", "-o", str(args.out / "recipes.png"), home=home)
            print(f"wrote {args.out / 'results.json'} and {args.out / 'recipes.png'}")
    print_footer()


if __name__ == "__main__":
    main()
