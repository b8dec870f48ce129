"""Time to first token of the patched llama.cpp tools, every row vs --image-keep, side by side.

    python patches/bench_tools.py [--bin build/llama.cpp/bin] [--family llava|qwen2.5-vl|gemma3]
                                  [--shape 7b] [--keep 64] [--repeat 3] [--turns 3] [--no-cli]

Writes (once) the random-weight pair of the family and shape into trimcpp's model cache, as `trimcpp
bench` does, and uses 640 x 480 demo pictures (a new one for each conversation, so no cache helps a
first turn). LLaVA runs with the LLaVA-1.5 prompt format, the other families with their GGUF's
template. In interleaved rounds it measures:

- llama-mtmd-cli: the wall time of one run with -n 1 (model load from the page cache, image encode,
  selection, prefill, one token; the tool logs no finer times);
- llama-server, one request: the latency of a chat request with max_tokens 1 and cache_prompt off
  (the model is loaded once; encode, selection, prefill, one token), every row ("image_keep": 0) vs
  --keep;
- llama-server, a conversation of --turns turns, the client resending the history each turn (as chat
  clients do; the answers between turns are fixed text): every row, --keep, and --keep on a second
  server started with --image-cache-mib 0 (what the encoder cache saves), each turn's latency and
  the tokens the server prefilled for it (its timings.prompt_n; the rest came from its prompt cache).

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
from trimcpp.testing import FAMILIES, cache_dir, demo_image, write_pair

LLAVA_TEMPLATE = ("{% for message in messages %}{% if message.role == 'user' %}USER: {{ message.content }}\n"
                  "{% elif message.role == 'assistant' %}ASSISTANT: {{ message.content }}\n{% endif %}"
                  "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
QUESTIONS = ["What is in the image?", "What colour is the largest shape?", "Is there anything on the ground?",
             "Which shape is furthest to the left?", "How many shapes are there?"]
ANSWER = "There are a few coloured shapes on a sky and ground background."


def cli_run(bin_dir: Path, llm: Path, mmproj: Path, image: Path, threads: int, keep: int | None,
            template: list[str]) -> float:
    """The wall seconds of one llama-mtmd-cli run with -n 1."""
    args = [str(bin_dir / "llama-mtmd-cli"), "-m", str(llm), "--mmproj", str(mmproj), "--image", str(image),
            "-p", QUESTIONS[0], "--jinja", *template, "-n", "1", "--temp", "0", "-c", "4096", "-t", str(threads)]
    if keep is not None:
        args += ["--image-keep", str(keep)]
    began = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        sys.exit(f"llama-mtmd-cli failed:\n{done.stderr[-2000:]}")
    return wall


class Server:
    def __init__(self, bin_dir: Path, llm: Path, mmproj: Path, threads: int, template: list[str], *flags: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.process = subprocess.Popen(
            [str(bin_dir / "llama-server"), "-m", str(llm), "--mmproj", str(mmproj), "--host", "127.0.0.1",
             "--port", str(self.port), "--jinja", *template, "-c", "8192", "-np", "1", "-t", str(threads), *flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        sys.exit("llama-server did not start")

    def request(self, messages: list[dict], keep: int, cache_prompt: bool) -> tuple[float, int]:
        """(seconds, tokens the server prefilled) of one chat request with max_tokens 1."""
        body = {"messages": messages, "max_tokens": 1, "temperature": 0, "cache_prompt": cache_prompt,
                "image_keep": keep}
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        began = time.perf_counter()
        with urllib.request.urlopen(request, timeout=1200) as r:
            reply = json.loads(r.read())
        return time.perf_counter() - began, int(reply["timings"]["prompt_n"])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


def conversation(image: bytes, turns: int) -> list[list[dict]]:
    """The messages a chat client sends at each of `turns` turns about one picture."""
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": QUESTIONS[0]}]}]
    sent = [list(messages)]
    for question in QUESTIONS[1:turns]:
        messages += [{"role": "assistant", "content": ANSWER}, {"role": "user", "content": question}]
        sent.append(list(messages))
    return sent


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    demo_image(seed=seed).save(buffer, "PNG")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bin", type=Path, default=Path("build/llama.cpp/bin"))
    parser.add_argument("--family", default="llava", choices=FAMILIES)
    parser.add_argument("--shape", default="7b")
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--turns", type=int, default=3, choices=range(1, len(QUESTIONS) + 1))
    parser.add_argument("--no-cli", action="store_true", help="leave out the llama-mtmd-cli runs")
    parser.add_argument("--threads", type=int, default=0, help="default: every core")
    args = parser.parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    folder = cache_dir() / "models"
    llm, mmproj = write_pair(folder, args.shape, family=args.family)
    template: list[str] = []  # the server's flags (it reads a template from a file), then the cli's
    cli_template: list[str] = []
    if args.family == "llava":
        path = folder / "bench-template.jinja"
        path.write_text(LLAVA_TEMPLATE)
        template, cli_template = ["--chat-template-file", str(path)], ["--chat-template", LLAVA_TEMPLATE]
    image = folder / "demo-640x480.png"
    image.write_bytes(png(0))

    cli: dict[str, list[float]] = {"all": [], "keep": []}
    single: dict[str, list[float]] = {"all": [], "keep": []}
    arms = {"all": 0, "keep": args.keep, "keep, no encoder cache": args.keep}
    turns: dict[str, list[list[tuple[float, int]]]] = {arm: [[] for _ in range(args.turns)] for arm in arms}
    server = Server(args.bin, llm, mmproj, threads, template)
    uncached = Server(args.bin, llm, mmproj, threads, template, "--image-cache-mib", "0")
    seed = 1
    try:
        server.request(conversation(png(seed), 1)[0], 0, False)  # warm-up: page cache, first graph
        for _ in range(args.repeat):
            if not args.no_cli:
                for arm, keep in (("all", None), ("keep", args.keep)):
                    cli[arm].append(cli_run(args.bin, llm, mmproj, image, threads, keep, cli_template))
            for arm, keep in (("all", 0), ("keep", args.keep)):
                seed += 1  # a picture the encoder cache has not seen
                single[arm].append(server.request(conversation(png(seed), 1)[0], keep, False)[0])
            for arm, keep in arms.items():
                seed += 1
                on = uncached if arm == "keep, no encoder cache" else server
                for turn, messages in enumerate(conversation(png(seed), args.turns)):
                    turns[arm][turn].append(on.request(messages, keep, True))
    finally:
        server.stop()
        uncached.stop()

    m = machine()
    print(f"{m['cpu']}, {m['cores']} cores, {threads} threads; {args.family} shape {args.shape}; medians of "
          f"{args.repeat} interleaved rounds (seconds)")
    print(f"| request | every row | --image-keep {args.keep} | speedup |")
    print("|---|---|---|---|")
    rows = [("llama-server, a chat request with max_tokens 1", single)]
    if not args.no_cli:
        rows.insert(0, ("llama-mtmd-cli, a run with -n 1 (wall time)", cli))
    for name, runs in rows:
        every, kept = statistics.median(runs["all"]), statistics.median(runs["keep"])
        print(f"| {name} | {every:.2f} | {kept:.2f} | {every / kept:.2f}x |")
    print()
    print("llama-server, a conversation (the client resends the history; max_tokens 1): seconds per turn "
          "(tokens prefilled)")
    print(f"| turn | every row | --image-keep {args.keep} | --image-keep {args.keep}, --image-cache-mib 0 | "
          "speedup vs every row |")
    print("|---|---|---|---|---|")
    for turn in range(args.turns):
        cells = {arm: (statistics.median(s for s, _ in turns[arm][turn]), turns[arm][turn][-1][1]) for arm in arms}
        print(f"| {turn + 1} | " + " | ".join(f"{s:.2f} ({n})" for s, n in cells.values())
              + f" | {cells['all'][0] / cells['keep'][0]:.2f}x |")


if __name__ == "__main__":
    main()
