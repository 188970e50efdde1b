"""The README's "Serving" section, run as written: its shell block (make a checkpoint, start `tensorstream serve`, wait
for /ready, a completion with curl, the metrics) and then its Python block (the OpenAI client, chat and streaming)
against that server. Only the paths and the port are replaced (a temporary folder, a free port), `tensorstream` /
`python3` by this interpreter (the checkout is not pip-installed here), and the wait loop also stops when the server
died."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("openai")

from tensorstream.testing.http_server import free_port  # noqa: E402

README = pathlib.Path(__file__).resolve().parents[3] / "README.md"


def section_blocks(heading: str):
    text = README.read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, re.S)


def localise(text: str, tmp_path: pathlib.Path, port: int) -> str:
    text = (text.replace("/tmp/tiny", str(tmp_path / "tiny")).replace("/tmp/ts-store", str(tmp_path / "store"))
            .replace("localhost:8000", f"127.0.0.1:{port}").replace("--port 8000", f"--port {port}"))
    text = re.sub(r"^python3 -m ", "TS_PYTHON -m ", text, flags=re.M)
    text = re.sub(r"^tensorstream serve ", "TS_PYTHON -m tensorstream serve ", text, flags=re.M)
    # A server that dies must fail the test, not leave the wait loop spinning until the timeout.
    text = text.replace("do sleep 1; done", "do kill -0 %1 || exit 3; sleep 1; done")
    return text.replace("TS_PYTHON", sys.executable)


def test_the_readme_serving_section_runs_as_written(tmp_path):
    blocks = section_blocks("Serving")
    shell = [body for lang, body in blocks if lang == "bash"][0]
    client = [body for lang, body in blocks if lang == "python"][0]
    port = free_port()
    (tmp_path / "client.py").write_text(localise(client, tmp_path, port))
    script = ("set -euo pipefail\n" + localise(shell, tmp_path, port) +
              f"echo; {sys.executable} {tmp_path / 'client.py'}\nkill %1\nwait %1 || true\n")
    env = {**os.environ, "TENSORSTREAM_PROGRESS": "0"}
    result = subprocess.run(["timeout", "300", "bash", "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    completion = json.loads(next(line for line in lines if line.startswith('{"id"')))
    assert completion["object"] == "text_completion" and completion["usage"]["completion_tokens"] == 8
    assert any(line.startswith('tensorstream_generation_tokens_total{model="') for line in lines)
    assert "CompletionUsage(" in result.stdout  # the client printed the chat reply and its usage
