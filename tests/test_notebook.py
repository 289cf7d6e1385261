"""The script pasted into a Jupyter notebook, as users of the cookbook do: a real kernel, two cells."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import API_KEY, SCRIPT

jupyter_client = pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")


def run_cell(client: Any, code: str, timeout: float = 60) -> tuple[str, list[dict[str, Any]], list[str]]:
    """Execute one cell; return its status, its error messages and what it printed (stdout and stderr)."""
    message_id = client.execute(code)
    errors: list[dict[str, Any]] = []
    printed: list[str] = []
    while True:
        message = client.get_iopub_msg(timeout=timeout)
        if message["parent_header"].get("msg_id") != message_id:
            continue
        kind, content = message["msg_type"], message["content"]
        if kind == "error":
            errors.append(content)
        elif kind == "stream":
            printed.append(content["text"])
        elif kind == "status" and content["execution_state"] == "idle":
            break
    reply = client.get_shell_msg(timeout=timeout)
    return reply["content"]["status"], errors, printed


def test_the_whole_file_in_a_cell_defines_everything_and_the_next_cell_awaits_it(fake_server):
    fake = fake_server(latency=(0.5, 0.5))
    manager, client = jupyter_client.manager.start_new_kernel(kernel_name="python3")
    try:
        status, errors, printed = run_cell(client, SCRIPT.read_text(encoding="utf-8"))
        assert status == "ok" and errors == [], errors
        assert "usage" not in "".join(printed) and "error" not in "".join(printed)  # argparse never ran

        status, errors, printed = run_cell(client, f"""
NOTEBOOK_STATUS_SECONDS = 0.2  # instead of 5 s: the status lines of a short run, sooner
requests = [{{"model": "claude-sonnet-5-5", "max_tokens": 50, "metadata": {{"x": x}},
             "messages": [{{"role": "user", "content": f"How much is 8 * {{x}}?"}}]}} for x in range(3)]
results = await process_requests(requests, request_url={fake.url!r}, api_key={API_KEY!r})
print([(result.metadata["x"], result.text) for result in results])
""")
        assert status == "ok" and errors == [], errors
        output = "".join(printed)
        assert "[(0, 'Echo: How much is 8 * 0?'), (1, 'Echo: How much is 8 * 1?'), (2, 'Echo: How much is 8 * 2?')]" \
            in output
        assert "INFO    Finished after" in output  # the run's summary reaches the notebook through loguru...
        assert "INFO    Status: " in output  # ...with status lines between the start and the summary...
        assert "\x1b[" not in output and "process_requests:" not in output  # ...without colours or code locations

        status, errors, printed = run_cell(client, "from loguru import logger; logger.info('the user logs')")
        user_line = "".join(printed)
        assert "the user logs" in user_line and "<module>" in user_line and "\x1b[" in user_line  # loguru's own again
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
