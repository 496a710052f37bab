"""Generation speed: gptctl's KV-cache engine against transformers' generate, on the same weights.

Reproduce (CPU, the ~10M `small` preset: block size 1024, so a 512-token prompt and 256 new tokens fit;
about 5 minutes per architecture on a shared 2-core machine):

    python benchmarks/generate.py
    python benchmarks/generate.py --arch modern          # against Qwen3ForCausalLM
    python benchmarks/generate.py --preset gpt2 --threads 2 --repeats 2    # gpt2 124M, where it runs in time

One randomly initialised gptctl model is exported by gptctl's own export code (engine/hf.py, what
`gptctl export` writes: GPT2LMHeadModel for --arch gpt2, Qwen3ForCausalLM for modern) and loaded back
by transformers in fp32. Both decode greedily the same prompt of random tokens: gptctl through
engine.generate.Generation (its text decoding included), transformers through
generate(use_cache=True, do_sample=False). Batch 8 is 8 samples of one prompt: gptctl prefills it
once and copies the cache to 8 rows; transformers is given the prompt 8 times. Each repeat runs every
case on both sides, alternating which side goes first.

Time to first token (TTFT) is from the call until the first new token exists (transformers: its
streamer's second put, the first being the prompt). Decode tokens/s is batch × (new tokens − 1) over
the time after the first token: the steady per-token speed, without the prefill. Medians over the
repeats; ratios are gptctl/transformers for speed (above 1: gptctl faster) and transformers/gptctl
for TTFT. The "same tokens" column says whether both sides chose the same tokens in every row (a
random model's logits are close together, so different rounding may pick another token: then the
work is still the same amount).

--threads sets torch's thread count for both sides (default 1: on two busy cores, two OpenMP threads
wait for each other whenever another process takes a core, see benchmarks/README.md).
"""

import argparse
import dataclasses
import time

from _common import load_average, median, print_footer, print_header, print_table, scratch_dir


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="gptctl model preset (default: small)")
    parser.add_argument("--arch", default="gpt2", choices=["gpt2", "modern"])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompts", default="16,512", help="prompt lengths in tokens, comma-separated")
    parser.add_argument("--batches", default="1,8", help="batch sizes (samples of one prompt), comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from gptctl.data.tokenizer import EOT_TOKEN, get_encoding
    from gptctl.engine import hf
    from gptctl.engine.generate import Generation, Sampling
    from gptctl.engine.model import GPT
    from gptctl.presets import GPT2_VOCAB_SIZE, PRESETS

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    command = (f"python benchmarks/generate.py --preset {args.preset} --arch {args.arch} --new-tokens {args.new_tokens} "
               f"--prompts {args.prompts} --batches {args.batches} --repeats {args.repeats} --threads {args.threads}")
    print_header("generation: gptctl KV-cache engine vs transformers generate", command)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s), fp32, CPU")

    shape = dataclasses.replace(PRESETS[args.preset], arch=args.arch)
    torch.manual_seed(args.seed)
    ours = GPT(shape).eval()
    enc = get_encoding()
    with scratch_dir() as work:
        hf.export(ours, enc, "hf", work / "hf", {"model": args.preset})
        theirs = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
    print(f"model: {args.preset} ({args.arch}, {ours.num_params() / 1e6:.1f}M parameters, block size {shape.block_size}) "
          f"and its export, {type(theirs).__name__}")

    class FirstToken(BaseStreamer):
        """transformers puts the prompt first, then each step's tokens: the second put is the first token."""

        def __init__(self):
            self.puts, self.at = 0, None

        def put(self, value):
            self.puts += 1
            if self.puts == 2:
                self.at = time.perf_counter()

        def end(self):
            pass

    def run_ours(prompt: list[int], batch: int) -> tuple[float, float, list[list[int]]]:
        start = time.perf_counter()
        generation = Generation(ours, enc, prompt, args.new_tokens, Sampling(temperature=0), batch)
        generation.step()
        first = time.perf_counter()
        tokens = generation.run()
        return first - start, time.perf_counter() - start, tokens

    def run_theirs(prompt: list[int], batch: int) -> tuple[float, float, list[list[int]]]:
        ids = torch.tensor([prompt] * batch)
        streamer = FirstToken()
        start = time.perf_counter()
        with torch.inference_mode():
            out = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                  do_sample=False, use_cache=True, pad_token_id=EOT_TOKEN, streamer=streamer)
        end = time.perf_counter()
        return streamer.at - start, end - start, out[:, len(prompt):].tolist()

    cases = [(b, p) for p in map(int, args.prompts.split(",")) for b in map(int, args.batches.split(","))]
    if max(p for _, p in cases) + args.new_tokens > shape.block_size:
        raise SystemExit(f"--prompts: prompt + {args.new_tokens} new tokens must fit the block size {shape.block_size}")
    rng = torch.Generator().manual_seed(args.seed)
    prompts = {p: torch.randint(0, GPT2_VOCAB_SIZE - 1, (p,), generator=rng).tolist() for _, p in cases}
    run_ours(prompts[cases[0][1]], 1), run_theirs(prompts[cases[0][1]], 1)  # warm-up: first-call costs on neither side

    times = {(case, side): [] for case in cases for side in ("gptctl", "transformers")}
    same = {}
    for repeat in range(args.repeats):
        for i, (batch, length) in enumerate(cases):
            sides = [("gptctl", run_ours), ("transformers", run_theirs)]
            results = {}
            for side, run in sides if (repeat + i) % 2 == 0 else sides[::-1]:
                ttft, total, tokens = run(prompts[length], batch)
                if any(len(row) != args.new_tokens for row in tokens):
                    raise SystemExit(f"{side} ended a row before {args.new_tokens} tokens (end-of-text); try another --seed")
                times[(batch, length), side].append((ttft, total))
                results[side] = tokens
            same[batch, length] = results["gptctl"] == results["transformers"]
        print(f"repeat {repeat + 1}/{args.repeats} done (load average now {load_average()})", flush=True)

    rows = []
    for batch, length in cases:
        figures = {}
        for side in ("gptctl", "transformers"):
            runs = times[(batch, length), side]
            ttft = median([t for t, _ in runs])
            decode = median([batch * (args.new_tokens - 1) / (total - t) for t, total in runs])
            figures[side] = (ttft, decode)
        (ttft_o, dec_o), (ttft_t, dec_t) = figures["gptctl"], figures["transformers"]
        rows.append([f"B{batch} P{length}", dec_o, dec_t, dec_o / dec_t, ttft_o * 1000, ttft_t * 1000, ttft_t / ttft_o,
                     "yes" if same[batch, length] else "no"])
    print_table(f"greedy decode, {args.new_tokens} new tokens, median of {args.repeats}",
                ["case", "gptctl tok/s", "transformers tok/s", "speed ratio", "gptctl TTFT ms", "transformers TTFT ms",
                 "TTFT ratio", "same tokens"], rows)
    print(f"\ndecode speed ratio gptctl/transformers: {', '.join(f'{r[0]} {r[3]:.2f}' for r in rows)} (target ≥ 1.0)")
    print_footer()


if __name__ == "__main__":
    main()
