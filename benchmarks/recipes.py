"""The classic GPT-2 recipe against the Muon recipe: val loss against tokens, from the same initial
weights on the same data, trained alternately in one invocation, each with the same number of LR tries.

classic: AdamW at --max-lr, linear warmup, cosine decay to max_lr/10 (GPT-2's, gptctl's default).
muon:    --optimizer muon (Muon at --muon-lr for the block matrices, AdamW at --max-lr for embeddings
         and 1-D parameters), --lr-scheduler wsd (warmup, stable, linear decay over the last 20 %: the
         speedrun's schedule).

The sweep: try i trains classic at --max-lr C[i], then muon at --muon-lr M[i] with its AdamW part at
C[i]; the tries alternate, so that a load change on the shared machine falls on both recipes.

Data: ../shared/data/shakespeare-works/ (42 plays and poems) prepared by `gptctl data prepare`, with
whole plays held out as val (--val-plays: they come first and --val-tokens is exactly their tokens).
Every run is a real `gptctl pretrain` (same --seed: the same initial weights; the batch of a step is a
function of the step: the same data order). The figure: tokens each recipe's best run needs to reach
the classic best run's final val loss (linear between evals), and their ratio; plus a PNG of both
best runs from `gptctl runs plot` (needs matplotlib).

The muon recipe changes two things at once. Unless --no-ablation, two more runs separate them, each at
its recipe's best LRs: AdamW with the wsd schedule ("adamw-wsd") and Muon with the cosine schedule
("muon-cosine"); their tokens to the same target say how much of the gain is the optimizer's.

    python benchmarks/recipes.py --model small --seq-len 128 --batch-size 8 --total-batch-size 4096 \
        --steps 200 --warmup-steps 10 --eval-interval 20 --eval-steps 16 \
        --classic-lrs 1e-3,2e-3,4e-3 --muon-lrs 0.01,0.02,0.04 --out benchmarks/recipes
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
           "--run-name", name, *extra, home=home)
    shown = json.loads(gptctl("runs", "show", name, "--json", home=home).stdout)
    return [(m["tokens_seen"], m["val_loss"]) for m in shown["metrics"] if m["val_loss"] is not None]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--total-batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--eval-interval", type=int, default=25)
    parser.add_argument("--eval-steps", type=int, default=16)
    parser.add_argument("--classic-lrs", default="6e-4,1.2e-3,2.4e-3", help="--max-lr values tried for classic")
    parser.add_argument("--muon-lrs", default="0.01,0.02,0.04", help="--muon-lr values tried for muon")
    parser.add_argument("--val-plays", default="hamlet,macbeth,tempest")
    parser.add_argument("--data-root", type=Path, default=None, help="An already prepared data root.")
    parser.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True,
                        help="Also train adamw-wsd and muon-cosine at the best LRs (optimizer vs schedule).")
    parser.add_argument("--out", type=Path, default=None, help="Where to write results.json and recipes.png.")
    args = parser.parse_args()
    classic_lrs = [float(x) for x in args.classic_lrs.split(",")]
    muon_lrs = [float(x) for x in args.muon_lrs.split(",")]
    print_header("recipes", "python benchmarks/recipes.py " + " ".join(
        (f"--{k.replace('_', '-')}" if v else f"--no-{k.replace('_', '-')}") if isinstance(v, bool)
        else f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None))

    with scratch_dir() as work:
        data = args.data_root or prepare(work, args.val_plays.split(","))
        home = work / "home"
        curves: dict[str, list] = {}
        if len(classic_lrs) != len(muon_lrs):
            raise SystemExit("--classic-lrs and --muon-lrs: give both recipes the same number of tries")
        lrs_of: dict[str, tuple[float, float]] = {}
        for classic_lr, muon_lr in zip(classic_lrs, muon_lrs):
            curves[f"classic-{classic_lr:g}"] = train(home, data, f"classic-{classic_lr:g}", args,
                                                      ["--max-lr", str(classic_lr)])
            curves[f"muon-{muon_lr:g}"] = train(home, data, f"muon-{muon_lr:g}", args,
                                                muon_options(muon_lr, classic_lr, "wsd"))
            lrs_of[f"classic-{classic_lr:g}"] = lrs_of[f"muon-{muon_lr:g}"] = (classic_lr, muon_lr)
        best_classic = min((c for c in curves if c.startswith("classic")), key=lambda c: curves[c][-1][1])
        best_muon = min((c for c in curves if c.startswith("muon")), key=lambda c: curves[c][-1][1])
        target = curves[best_classic][-1][1]
        classic_tokens = tokens_to_reach(curves[best_classic], target)
        muon_tokens = tokens_to_reach(curves[best_muon], target)
        ablation = {}
        if args.ablation:
            curves["adamw-wsd"] = train(home, data, "adamw-wsd", args,
                                        ["--max-lr", str(lrs_of[best_classic][0]), "--lr-scheduler", "wsd"])
            classic_lr, muon_lr = lrs_of[best_muon]
            curves["muon-cosine"] = train(home, data, "muon-cosine", args,
                                          muon_options(muon_lr, classic_lr, "cosine"))
            ablation = {name: tokens_to_reach(curves[name], target) for name in ("adamw-wsd", "muon-cosine")}
        print_table("final val loss of every try", ["run", "final val loss", "tokens"],
                    [[name, curve[-1][1], curve[-1][0]] for name, curve in curves.items()])
        ratio = classic_tokens / muon_tokens if muon_tokens else None
        print_table(f"tokens to reach the classic best's final val loss {target:.4f}",
                    ["recipe", "best run", "tokens"],
                    [["classic", best_classic, classic_tokens], ["muon", best_muon, muon_tokens or "not reached"]])
        print(f"\nratio classic/muon tokens: {ratio:.2f}" if ratio else "\nmuon did not reach it")
        if ablation:
            print_table("optimizer against schedule: tokens to reach the same target",
                        ["optimizer", "cosine", "wsd"],
                        [["adamw", classic_tokens, ablation["adamw-wsd"] or "not reached"],
                         ["muon", ablation["muon-cosine"] or "not reached", muon_tokens or "not reached"]])
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.json").write_text(json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "curves": curves, "best_classic": best_classic,
                 "best_muon": best_muon, "target": target, "classic_tokens": classic_tokens,
                 "muon_tokens": muon_tokens, "ratio": ratio, "ablation": ablation}, indent=2))
            gptctl("runs", "plot", best_classic, best_muon, "--x", "tokens", "-o", str(args.out / "recipes.png"),
                   home=home)
            print(f"wrote {args.out / 'results.json'} and {args.out / 'recipes.png'}")
    print_footer()


if __name__ == "__main__":
    main()
