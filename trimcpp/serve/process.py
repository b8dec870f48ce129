"""A server in a process of its own on 127.0.0.1, for the benchmark and the tests: ``trimcpp serve`` or
llama-cpp-python's own server, started, waited for and stopped."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any, Iterator, Optional, Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A started server: its process, port, log file and API key (if it has one)."""

    def __init__(self, process: subprocess.Popen, port: int, log: str, api_key: Optional[str] = None):
        self.process = process
        self.port = port
        self.log = log
        self.api_key = api_key

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self, key: bool = True) -> dict[str, str]:
        """A JSON request's headers, with the API key (if the server has one) unless `key` is false."""
        headers = {"Content-Type": "application/json"}
        if key and self.api_key is not None:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def request(self, method: str, path: str, body: Any = None, *, timeout: float = 600,
                key: bool = True) -> tuple[int, dict, bytes]:
        """One HTTP request (JSON body unless bytes), with the API key unless `key` is false:
        (status, headers, body)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        headers = self.headers(key)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def stream(self, body: dict, *, timeout: float = 600) -> Iterator[tuple[float, dict]]:
        """A streamed chat completion: (seconds since the request, chunk) for each event."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        began = time.perf_counter()
        try:
            connection.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}).encode(),
                               headers=self.headers())
            response = connection.getresponse()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
            for line in response:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                yield time.perf_counter() - began, json.loads(data)
        finally:
            connection.close()


@contextlib.contextmanager
def launch(module: str, args: Sequence[str], *, log: str, ready_s: float = 600,
           env: Optional[dict] = None, api_key: Optional[str] = None) -> Iterator[Server]:
    """``python -m <module> <args> --host 127.0.0.1 --port <free>`` (also as HOST and PORT, which a
    config file does not override), run in the log's folder (so that ``-m`` imports the installed
    package, not a source tree in the current directory), until it answers ``GET /v1/models``; stopped
    (SIGTERM, then SIGKILL) on leaving. RuntimeError with the log's tail if it exits first."""
    port = free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", module, *args, "--host", "127.0.0.1", "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, cwd=os.path.dirname(os.path.abspath(log)),
                                   env={**os.environ, **(env or {}), "HOST": "127.0.0.1", "PORT": str(port)})
    server = Server(process, port, log, api_key)
    try:
        deadline = time.monotonic() + ready_s
        while True:
            if process.poll() is not None:
                with open(log, "rb") as f:
                    tail = f.read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"{module} exited with status {process.returncode}:\n{tail}")
            try:
                if server.request("GET", "/v1/models", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{module} did not answer within {ready_s:g} s (log: {log})")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
