"""Concurrent throughput of `gptctl serve`: 8 requests at once (batched into shared decode steps) against
the same 8 one at a time, through HTTP.

Reproduce (CPU, the ~10M `small` preset, random init; about 3 minutes on a shared 2-core machine):

    python benchmarks/serve.py
    python benchmarks/serve.py --preset gpt2 --new-tokens 32 --repeats 1   # gpt2 124M

A randomly initialised model is saved as a gptctl checkpoint and served by a real `gptctl serve FILE
--port 0` process (its own torch threads: --threads). Each request is POST /v1/completions with a
prompt of 16 random token ids (a different prompt per request), max_tokens --new-tokens, temperature
0. "One at a time" sends the 8 requests in turn, each after the previous answer; "concurrent" sends
them from 8 threads at once, so that they join the batcher's decode batch together. Throughput is the
completion tokens of the 8 answers over the wall time of the 8; median over the repeats, which
alternate which mode goes first. "same text" says whether both modes gave every request the same
text (greedy: they should, the batch changes only the rounding of a row's matmuls).
"""

import argparse
import os
import subprocess
import threading
import time

from _common import cli_env, gptctl_command, median, print_footer, print_header, print_table, scratch_dir


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="gptctl model preset (default: small)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (default: 1)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import httpx
    import torch

    from gptctl.checkpoints.files import save_atomic
    from gptctl.engine.model import GPT
    from gptctl.presets import GPT2_VOCAB_SIZE
    from gptctl.settings import TrainSettings

    command = (f"python benchmarks/serve.py --preset {args.preset} --requests {args.requests} "
               f"--new-tokens {args.new_tokens} --repeats {args.repeats} --threads {args.threads}")
    print_header("gptctl serve: concurrent requests batched vs one at a time", command)
    rng = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(0, GPT2_VOCAB_SIZE - 1, (16,), generator=rng).tolist() for _ in range(args.requests)]
    with scratch_dir() as work:
        settings = TrainSettings(model=args.preset)
        torch.manual_seed(args.seed)
        model = GPT(settings.shape)
        path = work / "model_00000.pt"
        save_atomic({"model": model.state_dict(), "settings": settings.model_dump(mode="json"), "step": 0}, path)
        print(f"model: {args.preset} ({model.num_params() / 1e6:.1f}M parameters, block size {settings.shape.block_size}), "
              f"server with {args.threads} torch thread(s), {args.requests} requests of 16 prompt tokens, "
              f"{args.new_tokens} new tokens, greedy")
        del model
        env = {**cli_env(work / "home"), "OMP_NUM_THREADS": str(args.threads)}
        server = subprocess.Popen([*gptctl_command(), "serve", str(path), "--port", "0", "--max-batch", str(args.requests)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            url = None
            while url is None:
                line = server.stdout.readline()
                if not line:
                    raise SystemExit(f"gptctl serve ended: {server.stderr.read()}")
                if line.strip().startswith("API:"):
                    url = line.split()[1]
            run(args, url, prompts, httpx)
        finally:
            server.terminate()
            server.wait(30)
    print_footer()


def run(args, url: str, prompts: list[list[int]], httpx) -> None:
    client = httpx.Client(timeout=600)

    def ask(prompt: list[int]) -> dict:
        response = client.post(f"{url}/completions", json={"prompt": prompt, "max_tokens": args.new_tokens,
                                                           "temperature": 0})
        response.raise_for_status()
        return response.json()

    def one_at_a_time() -> list[dict]:
        return [ask(p) for p in prompts]

    def concurrent() -> list[dict]:
        answers = [None] * len(prompts)

        def worker(i):
            answers[i] = ask(prompts[i])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return answers

    ask(prompts[0])  # warm-up
    modes = {"one at a time": one_at_a_time, "concurrent": concurrent}
    rates, texts = {m: [] for m in modes}, {}
    for repeat in range(args.repeats):
        for name in (list(modes) if repeat % 2 == 0 else list(modes)[::-1]):
            start = time.perf_counter()
            answers = modes[name]()
            seconds = time.perf_counter() - start
            rates[name].append(sum(a["usage"]["completion_tokens"] for a in answers) / seconds)
            texts[name] = [a["choices"][0]["text"] for a in answers]
    health = client.get(f"{url.removesuffix('/v1')}/health").json()["batch"]
    sequential, batched = median(rates["one at a time"]), median(rates["concurrent"])
    print_table("throughput (median)", ["mode", "tok/s"], [["one at a time", f"{sequential:.1f}"], ["concurrent", f"{batched:.1f}"]])
    print(f"concurrent / one at a time: {batched / sequential:.2f}x; same text: {texts['concurrent'] == texts['one at a time']}; "
          f"most requests in one decode step: {health['max_jobs_per_step']}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
