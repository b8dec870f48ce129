"""Time to first token of the patched llama.cpp tools, every row vs --image-keep, side by side.

    python patches/bench_tools.py [--bin build/llama.cpp/bin] [--shape 7b] [--keep 64] [--repeat 3]

Writes (once) the random-weight pair of the shape into trimcpp's model cache, as `trimcpp bench` does,
and a 640 x 480 demo picture. In interleaved rounds it measures:

- llama-mtmd-cli: the wall time of one run with -n 1 (model load from the page cache, image encode,
  selection, prefill, one token; the tool logs no finer times);
- llama-server: the latency of one chat request with max_tokens 1 and cache_prompt off (the model is
  loaded once; encode, selection, prefill, one token), every row ("image_keep": 0) vs --keep.

Medians over the rounds; ratios are only meaningful within one run (the machine's speed drifts).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from trimcpp.bench import machine
from trimcpp.testing import cache_dir, demo_image, write_pair

TEMPLATE = ("{% for message in messages %}{% if message.role == 'user' %}USER: {{ message.content }}\n{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
QUESTION = "What is in the image?"


def cli_run(bin_dir: Path, llm: Path, mmproj: Path, image: Path, threads: int, keep: int | None) -> float:
    """The wall seconds of one llama-mtmd-cli run with -n 1."""
    args = [str(bin_dir / "llama-mtmd-cli"), "-m", str(llm), "--mmproj", str(mmproj), "--image", str(image),
            "-p", QUESTION, "--jinja", "--chat-template", TEMPLATE, "-n", "1", "--temp", "0", "-c", "4096",
            "-t", str(threads)]
    if keep is not None:
        args += ["--image-keep", str(keep)]
    began = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        sys.exit(f"llama-mtmd-cli failed:\n{done.stderr[-2000:]}")
    return wall


class Server:
    def __init__(self, bin_dir: Path, llm: Path, mmproj: Path, threads: int, template: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.process = subprocess.Popen(
            [str(bin_dir / "llama-server"), "-m", str(llm), "--mmproj", str(mmproj), "--host", "127.0.0.1",
             "--port", str(self.port), "--jinja", "--chat-template-file", str(template), "-c", "4096", "-np", "1",
             "-t", str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        sys.exit("llama-server did not start")

    def request(self, image: bytes, keep: int) -> float:
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": QUESTION}]}],
                "max_tokens": 1, "temperature": 0, "cache_prompt": False, "image_keep": keep}
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        began = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as r:
            json.loads(r.read())
        return time.perf_counter() - began

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bin", type=Path, default=Path("build/llama.cpp/bin"))
    parser.add_argument("--shape", default="7b")
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="default: every core")
    args = parser.parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    folder = cache_dir() / "models"
    llm, mmproj = write_pair(folder, args.shape, version="1.5")
    buffer = io.BytesIO()
    demo_image().save(buffer, "PNG")
    image = folder / "demo-640x480.png"
    image.write_bytes(buffer.getvalue())
    template = folder / "bench-template.jinja"
    template.write_text(TEMPLATE)

    cli: dict[str, list[float]] = {"all": [], "keep": []}
    server_s: dict[str, list[float]] = {"all": [], "keep": []}
    server = Server(args.bin, llm, mmproj, threads, template)
    try:
        server.request(image.read_bytes(), 0)  # warm-up: page cache, first graph
        for _ in range(args.repeat):
            for arm, keep in (("all", None), ("keep", args.keep)):
                cli[arm].append(cli_run(args.bin, llm, mmproj, image, threads, keep))
            for arm, keep in (("all", 0), ("keep", args.keep)):
                server_s[arm].append(server.request(image.read_bytes(), keep))
    finally:
        server.stop()

    m = machine()
    print(f"{m['cpu']}, {m['cores']} cores, {threads} threads; shape {args.shape}; medians of {args.repeat} "
          "interleaved rounds (seconds)")
    print(f"| tool | every row | --image-keep {args.keep} | speedup |")
    print("|---|---|---|---|")
    for name, runs in (("llama-mtmd-cli, a run with -n 1 (wall time)", cli),
                       ("llama-server, a chat request with max_tokens 1", server_s)):
        every, kept = statistics.median(runs["all"]), statistics.median(runs["keep"])
        print(f"| {name} | {every:.2f} | {kept:.2f} | {every / kept:.2f}x |")


if __name__ == "__main__":
    main()
