"""The plugin's settings: one set per model (``--hf-overrides``), overridable per request
(``mm_processor_kwargs``). Plain Python: vLLM and torch are not needed to check them."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence

from ..selection import (
    ADAPTIVE,
    ALIGNMENTS,
    DEFAULT_ALIGNMENT,
    DEFAULT_STAGE1_RATIO,
    METHODS,
    Keep,
    Stage1,
    check_keep,
    check_method,
    resolve_keep,
)

PREFIX = "trim_"
KEYS = ("trim_keep", "trim_method", "trim_alignment", "trim_stage1_ratio")
# A plan, the per-image tensor the processor hands the model, is five numbers: keep's kind (0 every row,
# 1 a count, 2 a share), keep, method and alignment (indices into METHODS and ALIGNMENTS), stage-1 ratio
# (-1: adaptive).


@dataclasses.dataclass(frozen=True)
class Settings:
    keep: Optional[Keep]  # None: every row (stock vLLM)
    method: str = "trimtokenator"
    alignment: str = DEFAULT_ALIGNMENT
    stage1_ratio: Stage1 = DEFAULT_STAGE1_RATIO

    def rows(self, n: int) -> int:
        """How many of an image's n rows reach the LLM."""
        if self.keep is None or self.method == "none":
            return n
        return min(n, resolve_keep("trimcpp.vllm", self.keep, n))

    def plan(self) -> list[float]:
        """The settings as a plan (above); `from_plan` reads them."""
        kind = 0 if self.keep is None else (1 if isinstance(self.keep, int) else 2)
        stage1 = -1.0 if self.stage1_ratio == ADAPTIVE else float(self.stage1_ratio)
        return [float(kind), float(self.keep or 0), float(METHODS.index(self.method)),
                float(ALIGNMENTS.index(self.alignment)), stage1]

    @classmethod
    def from_plan(cls, plan) -> "Settings":
        kind, keep, method, alignment, stage1 = (float(x) for x in plan)
        return cls(keep=(None, int(keep), keep)[int(kind)], method=METHODS[int(method)],
                   alignment=ALIGNMENTS[int(alignment)], stage1_ratio=ADAPTIVE if stage1 < 0 else stage1)


def _keep(value: Any, where: str) -> Optional[Keep]:
    bad = ValueError(f"{where}trim_keep must be a count (int >= 1), a share in (0, 1], or 0 for every row; got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad
    if value == 0:
        return None
    if isinstance(value, float) and value > 1 and value.is_integer():
        value = int(value)  # JSON numbers such as 64.0
    try:
        return check_keep("trim_keep", value)
    except (TypeError, ValueError):
        raise bad from None


def resolve(defaults: Mapping[str, Any], request: Mapping[str, Any], default_keep: Keep) -> Settings:
    """Settings from the model's (`defaults`: its config's trim_* keys) and one request's trim_* keys.

    Raises ValueError naming the key for an unknown trim_* key or a bad value (a start-up error for
    the model's, an HTTP 400 for a request's). The model's are checked even where a request overrides them."""
    if request:
        resolve(defaults, {}, default_keep)
    chosen: dict[str, tuple[str, Any]] = {"trim_keep": ("", default_keep)}  # key: (where it was set, value)
    for where, source in (("model config: ", defaults), ("mm_processor_kwargs: ", request)):
        for key, value in source.items():
            if not key.startswith(PREFIX):
                continue
            if key not in KEYS:
                raise ValueError(f"{where}unknown setting {key!r}; the trimcpp settings are {', '.join(KEYS)}")
            chosen[key] = (where, value)
    result: dict[str, Any] = {}
    for key, (where, value) in chosen.items():
        name = key[len(PREFIX):]
        if name == "keep":
            result[name] = _keep(value, where)
        elif name == "stage1_ratio":
            result[name] = value if value == ADAPTIVE else _number(value, where, key)
        else:
            result[name] = value
    settings = Settings(**result)
    try:
        check_method("trimcpp.vllm", settings.method, settings.stage1_ratio, settings.alignment)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{error} (settings trim_method, trim_alignment, trim_stage1_ratio)") from None
    return settings


def _number(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}{key} must be a number in (0, 1] or {ADAPTIVE!r}, got {value!r}")
    return float(value)


def model_defaults(config: Any, mm_processor_kwargs: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The trim_* keys of a model's Hugging Face config (set with --hf-overrides), then of its
    --mm-processor-kwargs."""
    found = {key: value for key, value in vars(config).items() if key.startswith(PREFIX)}
    found.update({key: value for key, value in (mm_processor_kwargs or {}).items() if key.startswith(PREFIX)})
    return found


def shrink_runs(ids: Sequence[int], token: int, rows: Callable[[int], int]) -> list[int]:
    """`ids` with each run of `token` (n long) cut to rows(n)."""
    out, run = [], 0
    for i in list(ids) + [None]:
        if i == token:
            run += 1
            continue
        out += [token] * rows(run) if run else []
        run = 0
        if i is not None:
            out.append(i)
    return out
