"""Write the caching example: 10 questions about one long document, a breakpoint of your own on it.

The document sits in a system block marked with cache_control, so the first request writes it to the
prompt cache and the others read it at a tenth of the price. A prefix shorter than the model's minimum
(1,024 tokens for most Sonnet and Opus models, 2,048 or 4,096 for Haiku) is silently not cached; this one
is about 2,000 tokens by cl100k_base, and more by Claude's count.

    python examples/generate_caching_requests.py [--output FILE]
"""

import argparse
import json
from pathlib import Path

MODEL = "claude-sonnet-5-5"  # Sonnet 5 and later reject non-default temperature, top_p and top_k

TOPICS = ["onboarding", "expenses", "travel", "security", "remote work", "hardware", "leave", "training",
          "code review", "incident response", "on-call", "hiring", "performance reviews", "procurement",
          "data retention", "customer support", "release management", "accessibility", "benefits", "offboarding"]


def handbook() -> str:
    sections = []
    for number, topic in enumerate(TOPICS, start=1):
        sections.append(
            f"Section {number}: {topic.title()}. Every employee follows the {topic} policy described here. "
            f"Questions about {topic} go first to your manager, then to the people team. The {topic} policy is "
            f"reviewed every year in March, and changes are announced two weeks before they take effect. "
            f"Exceptions to the {topic} policy need written approval from a director, recorded in the policy "
            f"tracker with the reason, the date and the person who approved it. Records about {topic} are kept "
            f"for seven years unless the data retention section says otherwise."
        )
    return "ACME CORPORATION EMPLOYEE HANDBOOK\n\n" + "\n\n".join(sections)


QUESTIONS = [f"Who approves exceptions to the {topic} policy, and where is that recorded?" for topic in TOPICS[:10]]

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--output", type=Path,
                    default=Path(__file__).parent / "test_caching_requests_to_parallel_process.jsonl",
                    help="where to write them (default: the example file beside this script)")
filename = parser.parse_args().output
document = handbook()
with open(filename, "w") as file:
    for row, question in enumerate(QUESTIONS):
        request = {
            "model": MODEL,
            "max_tokens": 1024,
            "system": [
                {"type": "text", "text": "You answer questions about the handbook below, briefly."},
                {"type": "text", "text": document, "cache_control": {"type": "ephemeral"}},
            ],
            "messages": [{"role": "user", "content": question}],
            "metadata": {"row_id": row},
        }
        file.write(json.dumps(request) + "\n")
print(f"Wrote {len(QUESTIONS)} requests to {filename}")
