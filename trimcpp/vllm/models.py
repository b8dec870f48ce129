"""vLLM's LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL and Gemma 3, with the image rows trimcpp keeps.

Each family is vLLM's own model and processor, subclassed:

- The processor (in the API server process) reads the settings (the model's, then the request's),
  finds each image's stage-1 text in the templated prompt, and puts both into the processor kwargs.
  Each picture's cache identity is vLLM's hash of the picture and the settings combined with its own
  text, so vLLM's processor, encoder and prefix caches never serve one question's rows for another,
  and the same question about the same picture still hits them. (A client that sends only a
  picture's uuid gets a cache miss for a new question.) Each image's placeholder run shrinks to the
  kept count; the settings and text ids travel to the model as per-image tensors.
- The model (in every worker) runs vLLM's encoder as usual, embeds the text ids with the LLM's own
  input embeddings, and keeps the rows trimcpp's C++ core picks (``trimcpp.prune``), in image order.

Qwen2.5-VL's kept rows keep their M-RoPE positions: the model appends each kept row's (t, h, w) as
three extra columns, and ``recompute_mrope_positions`` writes them into the request's positions
after the encoder ran. vLLM's runners call that only for models that prune (its EVS video pruning),
so ``enable_position_recompute`` turns it on for this model. Gemma 3 keeps each crop's kept rows
in one run of soft tokens between its start- and end-of-image tokens, where vLLM's attention rule
for image runs (bidirectional on the GPU backends that have it) applies to the kept run.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Optional

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.model_executor.models.gemma3_mm import (
    Gemma3DummyInputsBuilder,
    Gemma3ForConditionalGeneration,
    Gemma3MultiModalProcessor,
    Gemma3ProcessingInfo,
)
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    PixtralHFMultiModalProcessor,
    PixtralHFProcessingInfo,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing.processor import PromptUpdateDetails

from ..selection import KEEP_SHARE, Keep, prune
from .question import QuestionReader
from .settings import PREFIX, Settings, model_defaults, resolve, shrink_runs

PLAN, TEXT = "trim_plan", "trim_text"  # the per-image fields the processor adds
log = init_logger(__name__)  # vLLM's logging, so that its log shows the settings


def split_trim(kwargs) -> tuple[dict, dict]:
    """(the trim_* entries, the rest) of processor kwargs."""
    own = {k: v for k, v in kwargs.items() if k.startswith(PREFIX)}
    return own, {k: v for k, v in kwargs.items() if not k.startswith(PREFIX)}


class TrimProcessor:
    """Mixed in before a vLLM multimodal processor (see the module's docstring)."""

    default_keep: Keep = KEEP_SHARE

    def placeholder_id(self) -> int:
        """The token that stands for one image in the templated prompt, before vLLM expands it."""
        raise NotImplementedError

    def embed_token_id(self) -> int:
        """The token whose run holds an image's rows once expanded."""
        return self.placeholder_id()

    def _reader(self) -> QuestionReader:
        if getattr(self, "_trim_reader", None) is None:
            tokenizer = self.info.get_tokenizer()
            self._trim_reader = QuestionReader(tokenizer, tokenizer.convert_ids_to_tokens(self.placeholder_id()))
        return self._trim_reader

    def settings(self, request) -> Settings:
        model_config = self.info.ctx.model_config
        return resolve(model_defaults(self.info.get_hf_config(), model_config.mm_processor_kwargs), request,
                       self.default_keep)

    def apply(self, inputs, timing_ctx):
        request, kwargs = split_trim(inputs.hf_processor_mm_kwargs)
        settings = self.settings(request)
        images = inputs.mm_data_items.get_count("image", strict=False)
        texts = self._reader().per_image(inputs.prompt, images) if images else []
        kwargs[PLAN] = tuple(settings.plan())
        kwargs[TEXT] = tuple(tuple(t) for t in texts)
        return super().apply(dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs), timing_ctx)

    def get_dummy_inputs(self, *args, **kwargs):
        # vLLM sizes its encoder cache and budget by the profiling run's rows per image: every row, so that
        # a request may keep them all.
        inputs = super().get_dummy_inputs(*args, **kwargs)
        return dataclasses.replace(inputs, hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs, "trim_keep": 0})

    def _get_mm_hashes(self, inputs):
        # Each picture's cache identity: vLLM's (the picture, the other kwargs, the settings) and its own
        # stage-1 text, not the other pictures': a later turn's picture leaves an earlier one's identity
        # alone, and one picture asked about twice in a prompt is two items.
        own, rest = split_trim(inputs.hf_processor_mm_kwargs)
        texts = own.pop(TEXT, None)
        hashes = super()._get_mm_hashes(dataclasses.replace(inputs, hf_processor_mm_kwargs={**rest, **own}))
        if texts is not None and "image" in hashes:
            hashes = dict(hashes)
            hashes["image"] = [hashlib.sha256(f"{h}|trimcpp-text|{list(t)}".encode()).hexdigest()
                               for h, t in zip(hashes["image"], texts)]
        return hashes

    def _get_cache_missing_processor_kwargs(self, inputs, mm_is_cached):
        # The HF processor runs on the images the processor cache does not hold: their texts only.
        kwargs = dict(super()._get_cache_missing_processor_kwargs(inputs, mm_is_cached))
        cached = mm_is_cached.get("image")
        if TEXT in kwargs and cached is not None and len(cached) == len(kwargs[TEXT]):
            kwargs[TEXT] = tuple(text for text, hit in zip(kwargs[TEXT], cached) if not hit)
        return kwargs

    def _call_hf_processor(self, hf_data, hf_kwargs):
        return super()._call_hf_processor(hf_data, split_trim(hf_kwargs)[1])

    def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):
        own, rest = split_trim(hf_processor_mm_kwargs)
        processed_data = super()._postprocess_hf_mm_data(mm_inputs, rest, processed_data)
        texts = own.get(TEXT, ())
        if texts:
            if len(texts) != self._images_in(processed_data):
                raise RuntimeError(f"trimcpp: {len(texts)} stage-1 texts for {self._images_in(processed_data)} images")
            processed_data[PLAN] = [torch.tensor(own[PLAN], dtype=torch.float64)] * len(texts)
            processed_data[TEXT] = [torch.tensor(t, dtype=torch.long) for t in texts]
        return processed_data

    def _images_in(self, processed_data) -> int:
        return len(processed_data.get("pixel_values", processed_data.get("image_embeds", [])))

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, split_trim(hf_processor_mm_kwargs)[1]))
        fields[PLAN] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        fields[TEXT] = MultiModalFieldConfig.batched("image")
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        own, rest = split_trim(hf_processor_mm_kwargs)
        updates = super()._get_prompt_updates(mm_items, rest, out_mm_kwargs)
        if PLAN not in own:
            return updates
        settings = Settings.from_plan(own[PLAN])
        return [self._shrunk(u, settings) if u.modality == "image" else u for u in updates]

    def _shrunk(self, update, settings: Settings):
        stock, token = update.replacement, self.embed_token_id()

        def replacement(item_idx: int):
            found = stock(item_idx) if callable(stock) else stock
            if isinstance(found, str):
                found = self.info.get_tokenizer().encode(found, add_special_tokens=False)
            details = found if isinstance(found, PromptUpdateDetails) else PromptUpdateDetails.from_seq(list(found))
            return dataclasses.replace(details, full=shrink_runs(details.full, token, settings.rows))

        return dataclasses.replace(update, replacement=replacement)


class TrimModel:
    """Mixed in before a vLLM multimodal model: keeps the rows trimcpp picks (see the module's docstring)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        if vllm_config.compilation_config.cudagraph_mm_encoder and hasattr(self, "get_encoder_cudagraph_config"):
            raise ValueError("trimcpp: the encoder's CUDA graphs (cudagraph_mm_encoder) bypass embed_multimodal, "
                             "where the rows are kept; turn them off")
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        model_config = vllm_config.model_config
        defaults = model_defaults(model_config.hf_config, model_config.mm_processor_kwargs)
        resolve(defaults, {}, 1)  # a bad model setting stops vLLM here, naming it
        log.info("trimcpp: %s keeps %s image rows by default (settings %s; per request in mm_processor_kwargs)",
                 type(self).__name__, defaults.get("trim_keep", "the family's default number of"), defaults or "none set")

    def rows_per_run(self) -> Optional[int]:
        """Rows of one placeholder run (Gemma 3: one crop's); None: an image is one run."""
        return None

    def kept_indices(self, rows: torch.Tensor, plan, text: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Ascending indices of the rows of one image to keep, or None for every row."""
        settings = Settings.from_plan(plan.tolist() if isinstance(plan, torch.Tensor) else plan)
        n = rows.shape[0]
        run = self.rows_per_run() or n
        if all(settings.rows(min(run, n - start)) >= min(run, n - start) for start in range(0, n, run)):
            return None
        t = None
        if text is not None and text.numel():
            embed = self.get_language_model().embed_input_ids(text.to(rows.device).reshape(-1))
            t = embed.float().cpu().numpy()
        v = rows.detach().float().cpu().numpy()
        picks = []
        for start in range(0, n, run):
            chunk = v[start:start + run]
            picks.append(start + prune(chunk, t, settings.rows(chunk.shape[0]), method=settings.method,
                                       stage1_ratio=settings.stage1_ratio, alignment=settings.alignment))
        return torch.from_numpy(np.concatenate(picks)).to(rows.device)

    def embed_multimodal(self, **kwargs: object):
        plans, texts = kwargs.pop(PLAN, None), kwargs.pop(TEXT, None)
        embeds = super().embed_multimodal(**kwargs)
        if plans is None:
            return embeds
        out = []
        for i, rows in enumerate(embeds):
            keep = self.kept_indices(rows, plans[i], texts[i] if texts is not None else None)
            out.append(rows if keep is None else rows[keep])
        return out


# LLaVA-1.5 and LLaVA-NeXT ---------------------------------------------------------------------------------


class TrimLlavaProcessor(TrimProcessor, LlavaMultiModalProcessor):
    default_keep = 64  # the paper's 64 of 576

    def placeholder_id(self) -> int:
        return self.info.get_hf_config().image_token_index


def _llava_info(ctx):
    """vLLM's LLaVA architecture also serves Pixtral-HF checkpoints: those stay stock."""
    if type(ctx.get_hf_config().vision_config).__name__ == "PixtralVisionConfig":
        return PixtralHFProcessingInfo(ctx)
    return LlavaProcessingInfo(ctx)


def _llava_processor(info, dummy_inputs, **kwargs):
    if isinstance(info, PixtralHFProcessingInfo):
        return PixtralHFMultiModalProcessor(info, dummy_inputs, **kwargs)
    return TrimLlavaProcessor(info, dummy_inputs, **kwargs)


@MULTIMODAL_REGISTRY.register_processor(_llava_processor, info=_llava_info, dummy_inputs=LlavaDummyInputsBuilder)
class TrimLlavaForConditionalGeneration(TrimModel, LlavaForConditionalGeneration):
    pass


class TrimLlavaNextProcessor(TrimProcessor, LlavaNextMultiModalProcessor):
    def placeholder_id(self) -> int:
        return self.info.get_hf_config().image_token_index


@MULTIMODAL_REGISTRY.register_processor(TrimLlavaNextProcessor, info=LlavaNextProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class TrimLlavaNextForConditionalGeneration(TrimModel, LlavaNextForConditionalGeneration):
    pass


# Gemma 3 -------------------------------------------------------------------------------------------------------


class TrimGemma3Processor(TrimProcessor, Gemma3MultiModalProcessor):
    def placeholder_id(self) -> int:
        return self.info.get_hf_config().boi_token_index

    def _images_in(self, processed_data) -> int:
        return len(processed_data.get("num_patches", []))  # pixel_values has a row per crop

    def embed_token_id(self) -> int:
        return self.info.get_hf_config().image_token_index


@MULTIMODAL_REGISTRY.register_processor(TrimGemma3Processor, info=Gemma3ProcessingInfo,
                                        dummy_inputs=Gemma3DummyInputsBuilder)
class TrimGemma3ForConditionalGeneration(TrimModel, Gemma3ForConditionalGeneration):
    def rows_per_run(self) -> Optional[int]:
        return self.config.mm_tokens_per_image


# Qwen2.5-VL ----------------------------------------------------------------------------------------------------

POSITION_COLUMNS = 3  # (t, h, w) of a kept row within its image's merged grid, appended to its embedding


class TrimQwen2_5_VLProcessor(TrimProcessor, Qwen2_5_VLMultiModalProcessor):
    def placeholder_id(self) -> int:
        return self.info.get_hf_config().image_token_id

    def _images_in(self, processed_data) -> int:
        return len(processed_data.get("image_grid_thw", []))


@MULTIMODAL_REGISTRY.register_processor(TrimQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class TrimQwen2_5_VLForConditionalGeneration(TrimModel, Qwen2_5_VLForConditionalGeneration):
    recomputes_positions = True  # enable_position_recompute: the runner calls recompute_mrope_positions

    def __init__(self, *, vllm_config, prefix: str = ""):
        if self.is_multimodal_pruning_enabled_in(vllm_config):
            raise ValueError("trimcpp: Qwen2.5-VL with --video-pruning-rate (vLLM's EVS) is not supported; "
                             "the image rows trimcpp keeps and EVS's video rows need the same position path")
        if vllm_config.use_v2_model_runner:
            raise ValueError("trimcpp: Qwen2.5-VL's kept rows need vLLM's V1 model runner for their positions "
                             "(enable_position_recompute); set VLLM_USE_V2_MODEL_RUNNER=0")
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    @staticmethod
    def is_multimodal_pruning_enabled_in(vllm_config) -> bool:
        mm = vllm_config.model_config.multimodal_config
        return bool(mm is not None and mm.is_multimodal_pruning_enabled())

    def embed_multimodal(self, **kwargs: object):
        plans, texts = kwargs.pop(PLAN, None), kwargs.pop(TEXT, None)
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        out: list[torch.Tensor] = []
        for modality, item in inputs.items():
            if modality == "video":
                out += list(self._process_video_input(item))
                continue
            merge = self.config.vision_config.spatial_merge_size
            for i, rows in enumerate(self._process_image_input(item)):
                t, h, w = (int(x) for x in item["image_grid_thw"][i])
                grid = torch.from_numpy(np.indices((t, h // merge, w // merge)).reshape(3, -1).T.copy())
                keep = None if plans is None else self.kept_indices(rows, plans[i], None if texts is None else texts[i])
                if keep is not None:
                    rows, grid = rows[keep], grid[keep.cpu()]
                out.append(torch.cat([rows, grid.to(rows.device, rows.dtype)], dim=1))
        return out

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        """Stock Qwen2.5-VL positions, but an image's placeholder run may be shorter than its grid: its
        slots get provisional positions (recompute_mrope_positions writes the kept rows' own), and the
        text after it starts where it starts after the whole image."""
        parts, st, start = [], 0, 0
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        for feature, (offset, t, h, w, t_factor) in zip(features, self.iter_mm_grid_thw(mm_features)):
            text_len = offset - st
            parts.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + start)
            grid = np.indices((t, h, w))
            if t_factor != 1.0:
                grid[0] = (grid[0] * t_factor).astype(np.int64)
            grid = grid.reshape(3, -1) + start + text_len
            length = feature.mm_position.length
            parts.append(grid[:, :length])
            start = int(grid.max()) + 1
            st = offset + length
        if st < len(input_tokens):
            text_len = len(input_tokens) - st
            parts.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + start)
        positions = np.concatenate(parts, axis=1).reshape(3, -1)
        return torch.from_numpy(positions), int(positions.max() + 1 - len(input_tokens))

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions: torch.Tensor,
                                  num_computed_tokens: int):
        """Writes the kept image rows' positions (their extra columns: (t, h, w) in the image's grid, from
        the position after its vision-start token) into the request's positions; returns the
        embeddings without those columns. The runner passes the rows scheduled this step, in order."""
        stripped, offsets = [], []
        for m in multimodal_embeddings:
            if getattr(m, "modality", "image") == "image":
                stripped.append(m[:, :-POSITION_COLUMNS])
                offsets.append(m[:, -POSITION_COLUMNS:])
            else:
                stripped.append(m)
        positions = mrope_positions
        if offsets:
            positions = mrope_positions.clone()
            ids = torch.as_tensor(input_ids, device=positions.device)
            relative = torch.cat(offsets).to(positions.device).round().long().T
            tokens = (ids == self.config.image_token_id).nonzero().squeeze(1)
            tokens = tokens[tokens >= num_computed_tokens][:relative.shape[1]]
            if len(tokens) != relative.shape[1]:
                raise RuntimeError(f"trimcpp: {relative.shape[1]} kept image rows for {len(tokens)} image tokens")
            index = torch.arange(len(ids), device=positions.device)
            last_start = torch.cummax(torch.where(ids == self.config.vision_start_token_id, index, -1), 0).values
            positions[:, tokens] = positions[0, last_start[tokens]] + 1 + relative
        return stripped, positions, int(positions.max() + 1 - positions.shape[1])


def enable_position_recompute() -> None:
    """vLLM's runners call a model's recompute_mrope_positions only when pruning is on for the run
    (--video-pruning-rate); the CPU runner never does. After a runner loads a model that asks for it
    (``recomputes_positions``), this turns it on. Idempotent: ``register`` runs in every process."""
    runners = []
    for module, name in (("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
                         ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner")):
        try:
            runners.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            continue
    for runner in runners:
        load = runner.__dict__.get("load_model")
        if load is None or getattr(load, "trimcpp", False):
            continue

        def load_model(self, *args: Any, _load=load, **kwargs: Any):
            _load(self, *args, **kwargs)
            if getattr(self.get_model(), "recomputes_positions", False):
                self.is_multimodal_pruning_enabled = True

        load_model.trimcpp = True
        runner.load_model = load_model
