"""Prefill on attach: the picture's rows go into the KV cache while the user types the question.

:meth:`trimcpp.handlers.mechanism.Trimming.attach` encodes the pictures of the conversation's last
user message (as ``preload`` does), then, on a background thread, prefills the prompt up to and
including every row of them: the template's text before the picture (system prompt, "USER:") and
the rows, in batches of about :data:`BATCH_SECONDS` each (the progress a page can show). Only
that much can go ahead of the question: stage 1 reads its text, and the text after
the picture is the question's.

When the question comes, the request decides at once (:meth:`Prefill.claim`):

- ``"finish"``: the prefill goes on in full-size batches and the request waits for it, then finds
  the prompt up to the picture's last row in the KV cache and decodes only its own text; the
  picture is answered with every row (stock's answer);
- ``"stop"``: the batch in flight is abandoned (llama.cpp's abort callback: within one graph node on
  the CPU; a backend without one, such as CUDA, finishes the batch), the prefill removes the rows it
  decoded (one ``trim_kv`` to the picture's first position) and ends; the request takes the pruned
  path, reusing the text before the picture.

The policy (:data:`POLICIES`): ``"auto"`` finishes when the rows left take no longer than the
pruned path's rows (each estimated with the seconds per row measured on that Llama; ties to every
row), ``"full"`` always finishes, ``"pruned"`` never prefills (attach then only encodes). A
request from another conversation stops it; so does a second attach.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import threading
import weakref
from typing import Any, Callable, Optional

POLICIES = ("auto", "full", "pruned")
# A background batch takes about BATCH_SECONDS (progress moves that often; a question stops one at
# once through the abort flag, where the backend has one), and at least SMALLEST_BATCH rows: on this
# project's CPU (LLaVA-1.5-7B shape) 16 rows or more cost about what a full batch does per row, 8 rows 1.3x.
BATCH_SECONDS = 4.0
FIRST_BATCH = 32  # rows of the first background batch, before the Llama's speed is known
SMALLEST_BATCH = 16


class PrefillStopped(Exception):
    """Raised at a batch boundary of a background prefill that was told to stop."""


@dataclasses.dataclass
class Attached:
    """The result of :meth:`Trimming.attach`'s future: how far the background prefill got."""

    pictures: list[str]  # sha256 of each attached picture, in prompt order
    rows: int  # image rows of the attached pictures (all chunks)
    prefilled_rows: int  # of them in the KV cache when the prefill ended (rows, or 0 when it stopped)
    state: str  # "prefilled" (every row is in the KV cache), "stopped" (a request or attach stopped it), "encoded"
    encode_seconds: float  # the encodes this attach did (0 for pictures already cached)
    prefill_seconds: float  # the background decode of text and rows


@dataclasses.dataclass
class Decision:
    """What a request decided about the prefill it found (``ImageSelection.path`` and friends)."""

    path: str  # "full" (every row, prefilled on attach) or "pruned"
    pictures: frozenset  # the attached pictures' sha256
    rows_ahead: int  # rows the prefill had decoded when the request came (0 for "pruned")
    encode_seconds: float  # the attach's encodes
    prefill_seconds: float  # its background prefill
    waited: float  # how long the request waited for it


class AttachFuture(concurrent.futures.Future):
    """The future :meth:`Trimming.attach` returns (an :class:`Attached`), with its progress."""

    def __init__(self, prefill: "Prefill"):
        super().__init__()
        self._prefill = prefill
        self.encodes: list[concurrent.futures.Future] = []  # each picture's encode (a Preloaded)

    def progress(self) -> dict[str, Any]:
        """``state`` ("encoding", "waiting" for the model to be idle, "prefilling", then the result's
        state, or "failed"), ``rows`` (the attached pictures' rows, 0 until encoded) and
        ``prefilled_rows`` (of them in the KV cache)."""
        prefill = self._prefill
        with prefill.cond:
            return {"state": prefill.state, "rows": prefill.rows, "prefilled_rows": prefill.done}


class Prefill:
    """One background prefill: its progress and the decision a request gives it.

    Every field is read and written under :attr:`cond` (the handler's). A request decides at once
    (:meth:`claim`); the background thread reads the order before each text chunk and each batch of
    rows, and a "stop" also sets :attr:`abort`, the flag of llama.cpp's abort callback, so that a batch
    in flight ends within one graph node on the CPU (llama.cpp then drops that batch's cells)."""

    def __init__(self, cond: threading.Condition, llama: Any, messages: list[Any], pictures: list[str]):
        self.cond = cond
        self._llama = weakref.ref(llama)  # a Llama dropped meanwhile is freed
        self.messages = messages
        self.pictures = pictures
        self.future = AttachFuture(self)
        self.future.set_running_or_notify_cancel()
        self.state = "encoding"  # then "waiting" (for the model to be idle), "prefilling", and the result's state
        self.rows = 0  # attached image rows (known when the encode is done)
        self.chunk_rows: list[list[int]] = []  # per attached picture, its chunks' rows
        self.done = 0  # of them decoded
        self.encode_seconds = 0.0
        self.order: Optional[str] = None  # "stop" or "finish", set by a request (or "stop" by an attach)
        self.abort = ctypes.c_ubyte(0)  # nonzero: llama.cpp abandons the batch in flight
        self.thread: Optional[int] = None  # the background thread's ident

    @property
    def llama(self) -> Any:
        """The Llama it prefills (None once dropped)."""
        return self._llama()

    @property
    def finished(self) -> bool:
        return self.future.done()

    def encoded(self, chunk_rows: list[list[int]], seconds: float) -> None:
        with self.cond:
            self.chunk_rows, self.encode_seconds = chunk_rows, seconds
            self.rows = sum(sum(rows) for rows in chunk_rows)
            self.state = "waiting"
            self.cond.notify_all()

    def checkpoint(self, done: int) -> bool:
        """At a batch boundary of the background thread, `done` rows decoded: raises PrefillStopped
        on "stop"; True once told to finish."""
        with self.cond:
            self.done = done
            if self.order == "stop":
                raise PrefillStopped()
            return self.order == "finish"

    def stop(self) -> None:
        """Tells the prefill to stop now (unless a request already decided)."""
        with self.cond:
            if self.order is None:
                self._give("stop")

    def _give(self, order: str) -> None:
        self.order = order
        if order == "stop":
            self.abort.value = 1
        self.cond.notify_all()

    def claim(self, decide: Callable[["Prefill"], str]) -> int:
        """A request's turn: once the pictures are encoded (their rows known), gives the prefill
        ``decide(self)``'s order; returns the rows decoded by then. The caller then waits for
        :attr:`future` (the rest of the prefill, or its stop)."""
        with self.cond:
            while self.state == "encoding" and not self.finished:
                self.cond.wait()
            if self.order is None and not self.finished:
                self._give(decide(self))
            return self.done

    def end(self, result: Optional[Attached] = None, error: Optional[BaseException] = None) -> None:
        """The background thread's last act: the future done, every waiter woken."""
        with self.cond:
            if result is not None:
                self.state, self.done = result.state, result.prefilled_rows
                self.future.set_result(result)
            else:
                self.state = "failed"
                self.future.set_exception(error)
            self.cond.notify_all()


def continues(messages: list[Any], attached: list[Any]) -> bool:
    """Whether a request's `messages` continue the conversation `attached` was prefilled for: the
    same messages before its last one, and that user message starting with the attached one's
    content (the question's text comes after the pictures)."""
    if not attached or len(messages) < len(attached) or messages[: len(attached) - 1] != attached[:-1]:
        return False
    last, now = attached[-1], messages[len(attached) - 1]
    if not isinstance(now, dict) or now.get("role") != last.get("role"):
        return False
    content, before = now.get("content"), last.get("content") or []
    return isinstance(content, list) and content[: len(before)] == before


class Rates:
    """Seconds per image row measured on each Llama: background batches and pruned decodes."""

    def __init__(self) -> None:
        self._rates: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def note(self, llama: Any, kind: str, rows: int, seconds: float) -> None:
        if rows > 0 and seconds > 0:
            rates = self._rates.setdefault(llama, {})
            rate = seconds / rows
            rates[kind] = rate if kind not in rates else 0.5 * (rates[kind] + rate)

    def get(self, llama: Any, kind: str) -> Optional[float]:
        return self._rates.get(llama, {}).get(kind)


def next_batch(rate: Optional[float], n_batch: int) -> int:
    """Rows of the next background batch: about BATCH_SECONDS at the measured rate."""
    if rate is None:
        return min(FIRST_BATCH, n_batch)
    return max(SMALLEST_BATCH, min(n_batch, int(BATCH_SECONDS / rate)))

