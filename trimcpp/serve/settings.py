"""``trimcpp serve``'s settings: llama-cpp-python's server and model settings, plus what a model keeps
of each image (``trim-*`` chat formats) and where the server takes images from.

Every field is also a command-line flag (``--keep 64``) and a key of the config file, as in
llama-cpp-python's server; the config file's ``models`` may mix trimmed and stock formats.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, List, Optional, Union

from llama_cpp.server.settings import ModelSettings, ServerSettings
from pydantic import AfterValidator, Field, model_validator

from ..handlers import HANDLERS
from ..handlers.attach import POLICIES
from ..handlers.conversation import FOLLOW_UPS
from ..handlers.encoder import MOST
from ..selection import (
    ADAPTIVE,
    ALIGNMENTS,
    DEFAULT_ALIGNMENT,
    DEFAULT_STAGE1_RATIO,
    METHODS,
    Keep,
    Stage1,
    check_method,
    stage1_from_text,
)

TRIM_PREFIX = "trim-"

# chat_format of a trimmed model -> the llama-cpp-python chat_format it trims.
TRIM_FORMATS = {TRIM_PREFIX + name: name for name in HANDLERS}
TRIM_FIELDS = ("keep", "method", "stage1_ratio", "alignment", "follow_ups", "image_cache_bytes", "reuse_kv",
               "encoder_flash_attn", "encoder_threads", "image_min_tokens", "image_max_tokens", "attach_policy")
FLASH_ATTN = {"auto": "auto", "on": True, "off": False}  # a setting's text -> the handler's encoder_flash_attn
STAGE1_HELP = f"TrimTokenator's stage-1 share in (0, 1], or {ADAPTIVE} (round(sqrt(K N)) rows)"


def token_limit(name: str, description: str) -> Any:
    """An optional encoder setting (EncoderSettings field `name`), 1 to its bound, None by default."""
    return Field(default=None, ge=1, le=MOST[name], description=description)


def _stage1(value: Union[str, float]) -> Stage1:
    """A settings or request ``stage1_ratio`` (a flag arrives as text) as a handler takes it."""
    try:
        stage1 = stage1_from_text(value)
    except ValueError:
        stage1 = math.nan
    if stage1 != ADAPTIVE and not 0 < stage1 <= 1:
        raise ValueError(f"stage1_ratio must be a share in (0, 1] or {ADAPTIVE!r}, got {value!r}")
    return stage1


Stage1Setting = Annotated[Union[str, float], AfterValidator(_stage1)]


def handler_keep(value: float) -> Optional[Keep]:
    """A settings or request ``keep`` as a handler takes it: 0 -> every row (None), a share in (0, 1),
    or a whole count >= 1."""
    if value == 0:
        return None
    if 0 < value < 1:
        return float(value)
    if value >= 1 and float(value).is_integer():
        return int(value)
    raise ValueError(f"keep must be 0 (every row), a share in (0, 1) or a whole row count, got {value:g}")


class TrimModelSettings(ModelSettings):
    """A model: llama-cpp-python's settings; with a ``trim-*`` chat_format, also how it prunes."""

    chat_format: Optional[str] = Field(
        default=None,
        description="Chat format to use; trim-<format> (e.g. trim-llava-1-5, trim-qwen2.5-vl, trim-mtmd) prunes images",
    )
    keep: Optional[float] = Field(
        default=None, ge=0,
        description="trim-* formats: rows kept per image, a count, a share in (0, 1) or 0 for every row "
                    "(default: 64 for LLaVA-1.5, 320 for LLaVA-1.6, 1/9 of each image's rows otherwise)",
    )
    method: str = Field(default="trimtokenator", description=f"trim-* formats: selection method, one of {', '.join(METHODS)}")
    stage1_ratio: Stage1Setting = Field(default=DEFAULT_STAGE1_RATIO, description=f"trim-* formats: {STAGE1_HELP}")
    alignment: str = Field(default=DEFAULT_ALIGNMENT,
                           description=f"trim-* formats: stage 1's score, one of {', '.join(ALIGNMENTS)}")
    follow_ups: str = Field(default="keep-rows", description=f"trim-* formats: rows of images in earlier turns, "
                                                             f"one of {', '.join(FOLLOW_UPS)}")
    image_cache_bytes: int = Field(default=256 << 20, ge=0,
                                   description="trim-* formats: encoded rows of recent pictures kept, in bytes (0: off)")
    reuse_kv: bool = Field(default=True, description="trim-* formats: reuse the KV cache of the previous request's "
                                                     "common prefix (follow-up questions)")
    encoder_flash_attn: str = Field(default="auto", description="trim-* formats: flash attention in the image encoder, "
                                                                "auto (libmtmd's default), on or off; the LLM's is flash_attn")
    encoder_threads: Optional[int] = token_limit("threads", "trim-* formats: image encoder threads (default: n_threads_batch)")
    image_min_tokens: Optional[int] = token_limit("image_min_tokens", "trim-* formats, dynamic-resolution encoders "
                                                  "(Qwen2-VL, 2.5-VL): fewest rows per image (default: its own)")
    image_max_tokens: Optional[int] = token_limit("image_max_tokens", "trim-* formats, dynamic-resolution encoders: "
                                                  "most rows per image (default: the model's)")
    attach_policy: str = Field(default="auto", description="trim-* formats: a picture sent to the preload route is "
                               "also prefilled while the model is idle; the question then takes the sooner of "
                               f"finishing that and the pruned path (auto), waits for it (full) or only uses the "
                               f"encode (pruned); one of {', '.join(POLICIES)}")

    @model_validator(mode="after")
    def _check_trim(self) -> TrimModelSettings:
        if self.chat_format not in TRIM_FORMATS:
            given = [name for name in TRIM_FIELDS if name in self.model_fields_set]
            if given:
                raise ValueError(f"{', '.join(given)}: only for the trim-* chat formats "
                                 f"({', '.join(TRIM_FORMATS)}), not chat_format {self.chat_format!r}")
            return self
        if self.clip_model_path is None:
            raise ValueError(f"chat_format {self.chat_format}: clip_model_path (the mmproj GGUF) is required")
        if self.hf_model_repo_id is not None:
            raise ValueError(f"chat_format {self.chat_format}: models are local files here, not hf_model_repo_id")
        if self.keep is not None:
            handler_keep(self.keep)
        check_method("model settings", self.method, self.stage1_ratio, self.alignment)
        if self.follow_ups not in FOLLOW_UPS:
            raise ValueError(f"follow_ups must be one of {', '.join(FOLLOW_UPS)}, got {self.follow_ups!r}")
        if self.attach_policy not in POLICIES:
            raise ValueError(f"attach_policy must be one of {', '.join(POLICIES)}, got {self.attach_policy!r}")
        if self.encoder_flash_attn not in FLASH_ATTN:
            raise ValueError(f"encoder_flash_attn must be one of {', '.join(FLASH_ATTN)}, got {self.encoder_flash_attn!r}")
        return self

    def handler_options(self) -> dict[str, Any]:
        """The trimmed handler's keyword arguments (keep only when set: else the handler's default)."""
        options: dict[str, Any] = {name: getattr(self, name) for name in TRIM_FIELDS if name != "keep"}
        options["encoder_flash_attn"] = FLASH_ATTN[self.encoder_flash_attn]
        if self.keep is not None:
            options["keep"] = handler_keep(self.keep)
        return options

    def stock(self) -> ModelSettings:
        """These settings as llama-cpp-python's loader takes them: the stock format, no trimcpp keys."""
        values = {name: getattr(self, name) for name in ModelSettings.model_fields}
        values["chat_format"] = TRIM_FORMATS.get(self.chat_format or "", self.chat_format)
        values["chat_template_kwargs"] = None  # applied to the trimmed handler (trimcpp.serve.app)
        return ModelSettings.model_construct(**values)


class TrimServerSettings(ServerSettings):
    """The server: llama-cpp-python's settings, plus where images may come from."""

    interrupt_requests: bool = Field(
        default=False,
        description="Cut a streamed answer short when another request is waiting (off here, so that every answer "
                    "is whole; llama-cpp-python's server has it on)",
    )
    image_dir: Optional[str] = Field(default=None, description="Serve file: image URLs under this folder (default: "
                                                               "file: URLs are refused)")
    allow_http_images: bool = Field(default=False, description="Download http(s) image URLs (default: refused)")
    image_timeout: float = Field(default=10.0, gt=0, description="Seconds a download may take in all")
    max_image_bytes: int = Field(default=20 << 20, ge=1, description="Largest image file accepted, in bytes")
    max_image_pixels: int = Field(default=40_000_000, ge=1, description="Largest image accepted, in pixels")
    page: bool = Field(default=True, description="Serve the chat page at / (false: the API only)")


class TrimSettings(TrimServerSettings, TrimModelSettings):
    """One model from the command line."""


class TrimConfigFileSettings(TrimServerSettings):
    """The config file (JSON or YAML): server settings and a list of models."""

    models: List[TrimModelSettings] = Field(default=[], description="Model configs")
