"""A small offline lm-evaluation-harness task for trying `gptctl serve` with lm_eval: 40 four-way
multiple-choice questions from Tiny Shakespeare (the first half of a line; the choices are its own
second half and those of 3 other lines), as a local JSONL file and a task YAML that points at it.

    python benchmarks/lm_eval_task.py /tmp/lm_eval_task
    lm_eval --model local-completions \\
      --model_args model=RUN:STEP,base_url=http://127.0.0.1:8000/v1/completions,max_length=CONTEXT,num_concurrent=4 \\
      --tasks gptctl_tiny_shakespeare --include_path /tmp/lm_eval_task

Chance is 0.25.
"""

import argparse
import json
import random
from pathlib import Path

from _common import SHAKESPEARE

YAML = """task: gptctl_tiny_shakespeare
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    lines = [line.strip() for line in SHAKESPEARE.read_text().splitlines() if len(line.split()) >= 8]
    rng.shuffle(lines)
    asked, others = lines[:args.questions], lines[args.questions:]

    def halves(line: str) -> tuple[str, str]:
        words = line.split()
        return " ".join(words[:len(words) // 2]), " ".join(words[len(words) // 2:])

    args.directory.mkdir(parents=True, exist_ok=True)
    data = (args.directory / "tiny_shakespeare_mc.jsonl").resolve()
    with data.open("w") as f:
        for line in asked:
            context, answer = halves(line)
            choices = [halves(other)[1] for other in rng.sample(others, 3)] + [answer]
            rng.shuffle(choices)  # lm-eval puts a space between the context and a choice
            f.write(json.dumps({"context": context, "choices": choices, "label": choices.index(answer)}) + "\n")
    (args.directory / "gptctl_tiny_shakespeare.yaml").write_text(YAML.format(data=json.dumps(str(data))))
    print(f"task gptctl_tiny_shakespeare ({args.questions} questions) in {args.directory}")


if __name__ == "__main__":
    main()
