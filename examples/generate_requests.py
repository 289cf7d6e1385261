"""Writes examples/test_requests_to_parallel_process.jsonl: 10 small requests ("How much is 8 * x?")."""

import json
from pathlib import Path

MODEL = "claude-sonnet-5-5"  # Sonnet 5 and later reject non-default temperature, top_p and top_k
N_REQUESTS = 10

filename = Path(__file__).parent / "test_requests_to_parallel_process.jsonl"
jobs = [
    {
        "model": MODEL,
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": f"How much is 8 * {x}?"}],
        "metadata": {"row_id": x},
    }
    for x in range(N_REQUESTS)
]
with open(filename, "w") as file:
    file.writelines(json.dumps(job) + "\n" for job in jobs)
print(f"Wrote {len(jobs)} requests to {filename}")
