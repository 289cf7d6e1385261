"""Write a file of small test requests ("How much is 8 * x?"); by default, the example file's 10.

To turn your own rows (a CSV) into requests, see examples/rows_to_requests.py.

    python examples/generate_requests.py [--count 200] [--model claude-haiku-5-5] [--output requests.jsonl]
"""

import argparse
import json
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--count", type=int, default=10, help="how many requests (default: 10)")
parser.add_argument("--model", default="claude-sonnet-5-5",  # Sonnet 5 and later reject non-default sampling
                    help="the model of every request (default: claude-sonnet-5-5)")
parser.add_argument("--output", type=Path, default=Path(__file__).parent / "test_requests_to_parallel_process.jsonl",
                    help="where to write them (default: the example file beside this script)")
args = parser.parse_args()
jobs = [
    {
        "model": args.model,
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": f"How much is 8 * {x}?"}],
        "metadata": {"row_id": x},
    }
    for x in range(args.count)
]
with open(args.output, "w") as file:
    file.writelines(json.dumps(job) + "\n" for job in jobs)
print(f"Wrote {len(jobs)} requests to {args.output}")
