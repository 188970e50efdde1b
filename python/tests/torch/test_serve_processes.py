"""Several processes, one store (#15 item 8), as a deployment runs them: a convert job wrote the store; 4
`tensorstream serve MODEL_ID` processes stream from it (as replicas on a ReadOnlyMany volume would) while a fifth
process writes another model into the same store and a sixth runs `tensorstream cleanup` over and over. Every
answer must be the plain model's greedy tokens (a wrong byte would change them: every step streams every block and
verifies its checksums), every process must end cleanly, and the store must verify afterwards."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import tensorstream as ts  # noqa: E402
from tensorstream.testing.http_server import free_port  # noqa: E402
from tensorstream.testing.tiny_checkpoint import write_tiny_llama  # noqa: E402

READERS = 4
PROMPTS = [[2, 5, 6, 7], [2, 9, 10], [2, 12, 13, 14, 15], [2, 20, 21, 30]]


def cli(*args: str) -> list:
    return [sys.executable, "-m", "tensorstream", *args]


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        try:
            reply = httpx.get(f"{url}/ready", timeout=2)
            if reply.status_code == 200:
                return
            assert reply.json()["status"] != "failed", reply.json()["reason"]
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {timeout_s} s")


def test_four_servers_a_writer_and_cleanup_share_one_store(tmp_path):
    store = tmp_path / "store"
    first = write_tiny_llama(tmp_path / "first", hidden_size=64, layers=4, seed=1)
    second = write_tiny_llama(tmp_path / "second", hidden_size=512, layers=8, seed=2)  # ~50 MB: a write that lasts
    env = {**os.environ, "TENSORSTREAM_PROGRESS": "0"}
    converted = subprocess.run(cli("convert", str(first), "--storage-path", str(store), "--model-id", "shared",
                                   "--min-layer-size", "0"), capture_output=True, text=True, env=env, timeout=300)
    assert converted.returncode == 0, converted.stderr

    plain = transformers.AutoModelForCausalLM.from_pretrained(first).eval()
    expected = {}
    with torch.no_grad():
        for prompt in PROMPTS:
            out = plain.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
            expected[tuple(prompt)] = out[0, len(prompt):].tolist()

    ports = [free_port() for _ in range(READERS)]
    servers = [subprocess.Popen(cli("serve", "shared", "--storage-path", str(store), "--tokenizer", str(first),
                                    "--budget-gb", "0.000001", "--port", str(port), "--host", "127.0.0.1",
                                    "--max-batch", "4", "--log-level", "warning"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for port in ports]
    others = []
    try:
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url, server in zip(urls, servers):
            wait_ready(url, server)
        writer = subprocess.Popen(cli("convert", str(second), "--storage-path", str(store), "--model-id", "other",
                                      "--min-layer-size", "0"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        cleaner = subprocess.Popen(
            [sys.executable, "-c", "import sys, time, tensorstream as ts\n"
             "end = time.monotonic() + float(sys.argv[2])\n"
             "n = 0\n"
             "while time.monotonic() < end:\n"
             "    ts.cleanup_orphaned_files(sys.argv[1]); n += 1\n"
             "print(n)\n", str(store), "8"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        others = [writer, cleaner]

        def ask(job):
            url, prompt = job
            reply = httpx.post(f"{url}/v1/completions", json={"model": "shared", "prompt": prompt, "max_tokens": 8,
                                                               "temperature": 0}, timeout=120)
            return prompt, reply.status_code, reply.json()

        jobs = [(url, prompt) for url in urls for prompt in PROMPTS]
        rounds = 0
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            while rounds < 2 or any(process.poll() is None for process in others):  # read all the while
                for prompt, status, body in pool.map(ask, jobs):
                    assert status == 200, body
                    assert body["choices"][0]["token_ids"] == expected[tuple(prompt)], (prompt, body)
                rounds += 1
        for process in others:
            out, err = process.communicate(timeout=300)
            assert process.returncode == 0, err[-3000:]
        assert int(cleaner_runs := out.strip() or 0) >= 1, cleaner_runs
        for url in urls:
            health = httpx.get(f"{url}/health").json()
            assert health["status"] == "serving" and "last_error" not in health, health
    finally:
        for process in servers + others:
            if process.poll() is None:
                process.terminate()
        for process in servers:
            try:
                process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    assert {s.returncode for s in servers} <= {0, -15}
    report = ts.verify_storage_integrity(store)
    assert report.ok, str(report)
    assert set(ts.Storage(store).models()) == {"shared", "other"}


def test_a_server_serves_from_a_read_only_mount_of_the_store(tmp_path):
    """As the Deployment's replicas do (deploy/k8s: the store volume mounted readOnly)."""
    if os.geteuid() != 0:
        pytest.skip("bind mounts need root")
    store, mount = tmp_path / "store", tmp_path / "read-only"
    checkpoint = write_tiny_llama(tmp_path / "tiny", hidden_size=64, layers=4, seed=3)
    env = {**os.environ, "TENSORSTREAM_PROGRESS": "0"}
    converted = subprocess.run(cli("convert", str(checkpoint), "--storage-path", str(store), "--model-id", "ro",
                                   "--min-layer-size", "0"), capture_output=True, text=True, env=env, timeout=300)
    assert converted.returncode == 0, converted.stderr
    mount.mkdir()
    if subprocess.run(["mount", "--bind", str(store), str(mount)], capture_output=True).returncode != 0:
        pytest.skip("bind mounts are not permitted here")
    server = None
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(mount)], capture_output=True).returncode != 0:
            pytest.skip("read-only remounts are not permitted here")
        with pytest.raises(OSError):
            (mount / "probe").write_text("x")
        port = free_port()
        server = subprocess.Popen(cli("serve", "ro", "--storage-path", str(mount), "--tokenizer", str(checkpoint),
                                      "--budget-gb", "0.000001", "--port", str(port), "--host", "127.0.0.1",
                                      "--log-level", "warning"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, server)
        reply = httpx.post(f"{url}/v1/completions", json={"model": "ro", "prompt": [2, 5, 6], "max_tokens": 6,
                                                           "temperature": 0}, timeout=60)
        plain = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
        with torch.no_grad():
            expected = plain.generate(torch.tensor([[2, 5, 6]]), max_new_tokens=6, do_sample=False)[0, 3:].tolist()
        assert reply.status_code == 200 and reply.json()["choices"][0]["token_ids"] == expected, reply.text
    finally:
        if server is not None:
            server.terminate()
            server.communicate(timeout=60)
        subprocess.run(["umount", str(mount)], capture_output=True)
