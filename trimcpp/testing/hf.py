"""Random-weight Hugging Face checkpoints (config, safetensors, tokenizer, processor) that vLLM loads,
for the vLLM plugin's tests and benchmark. Needs torch and transformers (``pip install "trimcpp[vllm]"``).

    from trimcpp.testing.hf import write_hf
    folder = write_hf("models/llava", "llava", shape="tiny")

Families: ``llava`` (LLaVA-1.5), ``llava-next`` (LLaVA-1.6), ``qwen2.5-vl``, ``gemma3``. The vision
towers have the real image geometry (LLaVA: 336 px, 14 px patches, 576 rows; Gemma 3: 256 rows),
everything else is small unless the shape says otherwise. The tokenizer spells every byte with one
token (byte-level BPE without merges), so any text round-trips. Weights are drawn with a standard
deviation large enough that greedy answers depend on the picture and the question.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Sequence

FAMILIES = ("llava", "llava-next", "qwen2.5-vl", "gemma3")


@dataclasses.dataclass(frozen=True)
class HFShape:
    """The language model's size (the vision tower is the family's, scaled by `vision`)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ff: int
    vision: str  # "tiny": a few small layers; "full": the family's real vision tower
    dtype: str = "float32"


HF_SHAPES = {
    "tiny": HFShape(hidden=128, layers=2, heads=2, kv_heads=1, ff=256, vision="tiny"),  # head size 64 (vLLM CPU attention)
    # LLaMA-7B's language model (LLaVA-1.5-7B) with the real ViT-L/14-336 tower, in bfloat16 (13.5 GB).
    "7b": HFShape(hidden=4096, layers=32, heads=32, kv_heads=32, ff=11008, vision="full", dtype="bfloat16"),
    # A 1B-class language model with the real vision tower: what 2 CPU cores serve in seconds per request.
    "1b": HFShape(hidden=2048, layers=16, heads=16, kv_heads=16, ff=5504, vision="full", dtype="bfloat16"),
}

# The Llama-2 / LLaVA-1.5 conversation template (llava-hf's, content as a list of parts).
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _byte_tokenizer(specials: list[str], template: str, *, bos: Optional[str], eos: str, pad: str, vocab: int,
                    named: Optional[dict] = None, literal: Sequence[str] = ()):
    """A byte-level tokenizer: 256 byte tokens, `literal` (plain added tokens), then `specials` and unused
    ones up to `vocab`. `named` are the processor's named special tokens (image_token=... and the like)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .families import byte_chars

    tokens = {ch: i for i, ch in enumerate(byte_chars())}
    tokenizer = Tokenizer(models.BPE(vocab=tokens, merges=[], fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in literal])
    unused = [f"<unused{i}>" for i in range(vocab - len(tokens) - len(literal) - len(specials))]
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad,
                                   chat_template=template, **(named or {}))
    fast.add_special_tokens({"additional_special_tokens": specials + unused}, replace_extra_special_tokens=False)
    if len(fast) != vocab:
        raise AssertionError(f"tokenizer has {len(fast)} tokens, expected {vocab}")
    return fast


def _llama_text(shape: HFShape, vocab: int) -> dict[str, Any]:
    return dict(model_type="llama", hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, intermediate_size=shape.ff,
                vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5, torch_dtype=shape.dtype)


def _clip_vision(shape: HFShape) -> dict[str, Any]:
    full = shape.vision == "full"
    return dict(model_type="clip_vision_model", image_size=336, patch_size=14, hidden_size=1024 if full else 32,
                intermediate_size=4096 if full else 64, num_hidden_layers=24 if full else 2,
                num_attention_heads=16 if full else 2, projection_dim=768 if full else 32)


def _llava(shape: HFShape, next_: bool):
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    specials = ["<s>", "</s>", "<unk>", "<image>"]
    tokenizer = _byte_tokenizer(specials, LLAVA_TEMPLATE, bos="<s>", eos="</s>", pad="<unk>", vocab=320)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    common = dict(vision_config=_clip_vision(shape), text_config=_llama_text(shape, len(tokenizer)),
                  image_token_index=image_id, vision_feature_select_strategy="default", vision_feature_layer=-2)
    pixels = dict(image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    if next_:
        grid = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        config = LlavaNextConfig(**common, image_grid_pinpoints=grid, architectures=["LlavaNextForConditionalGeneration"])
        model = LlavaNextForConditionalGeneration
        images = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                         image_grid_pinpoints=grid, **pixels)
        processor = LlavaNextProcessor(images, tokenizer, patch_size=14, vision_feature_select_strategy="default",
                                       chat_template=LLAVA_TEMPLATE)
    else:
        config = LlavaConfig(**common, architectures=["LlavaForConditionalGeneration"])
        model = LlavaForConditionalGeneration
        images = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, **pixels)
        processor = LlavaProcessor(images, tokenizer, patch_size=14, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    return config, model, processor


# transformers 5 holds LLaVA's and Gemma 3's vision towers without the `vision_model` level that vLLM's
# CLIP and SigLIP loaders expect (its save_pretrained writes yet other, legacy names).
TOWER, TOWER_AS_VLLM_READS_IT = "model.vision_tower.", "model.vision_tower.vision_model."


def _save(model, folder: Path) -> None:
    """The config, and the weights under transformers 5's names (which vLLM's loaders map), the vision
    tower's as vLLM reads them; a tied lm_head is left out."""
    from safetensors.torch import save_file

    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tied = any(getattr(c, "tie_word_embeddings", False) for c in (model.config, model.config.get_text_config()))
    tower = model.config.vision_config.model_type in ("clip_vision_model", "siglip_vision_model")
    weights = {(TOWER_AS_VLLM_READS_IT + name[len(TOWER):] if tower and name.startswith(TOWER) else name): tensor.contiguous()
               for name, tensor in model.state_dict().items() if not (tied and name == "lm_head.weight")}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


# Qwen2.5-VL's template (its default system prompt kept: the boilerplate stage 1 must skip).
QWEN_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] in ('video', 'video_url') %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n"
    "{% if m['content'] is string %}{{ m['content'] | trim }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] in ('image', 'image_url') %}<start_of_image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] | trim }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _qwen(shape: HFShape):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                "<|image_pad|>", "<|video_pad|>"]
    tokenizer = _byte_tokenizer(specials, QWEN_TEMPLATE, bos=None, eos="<|im_end|>", pad="<|endoftext|>", vocab=320,
                                named={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                       "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})
    ids = tokenizer.convert_tokens_to_ids
    full = shape.vision == "full"
    text = dict(vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.ff,
                num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                "mrope_section": [16, 24, 24] if full else [8, 12, 12]},
                bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    vision = dict(depth=32 if full else 2, hidden_size=1280 if full else 64, intermediate_size=3420 if full else 128,
                  num_heads=16 if full else 2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=112, out_hidden_size=shape.hidden, fullatt_block_indexes=[7, 15, 23, 31] if full else [1],
                  tokens_per_second=2)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                              video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                              vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False,
                              architectures=["Qwen2_5_VLForConditionalGeneration"])
    size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
    images = Qwen2VLImageProcessorPil(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    videos = Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=videos,
                                    chat_template=QWEN_TEMPLATE)
    return config, Qwen2_5_VLForConditionalGeneration, processor


def _gemma(shape: HFShape):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                "<end_of_image>", "<image_soft_token>"]
    tokenizer = _byte_tokenizer(specials, GEMMA_TEMPLATE, bos="<bos>", eos="<eos>", pad="<pad>", vocab=320,
                                named={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                       "image_token": "<image_soft_token>"},
                                literal=["\n", "\n\n", "\n\n\n", "\n\n\n\n"])  # vLLM's Gemma 3 looks these up
    ids = tokenizer.convert_tokens_to_ids
    full = shape.vision == "full"
    head = shape.hidden // shape.heads
    text = dict(model_type="gemma3_text", vocab_size=len(tokenizer), hidden_size=shape.hidden,
                intermediate_size=shape.ff, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                num_key_value_heads=shape.kv_heads, head_dim=head, query_pre_attn_scalar=head, sliding_window=512,
                layer_types=["sliding_attention", "full_attention"] * (shape.layers // 2),
                max_position_embeddings=8192, pad_token_id=ids("<pad>"), eos_token_id=ids("<eos>"),
                bos_token_id=ids("<bos>"))
    vision = dict(model_type="siglip_vision_model", hidden_size=1152 if full else 64,
                  intermediate_size=4304 if full else 128, num_hidden_layers=27 if full else 2,
                  num_attention_heads=16 if full else 2, image_size=896, patch_size=14, vision_use_head=False)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256,
                          boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                          image_token_index=ids("<image_soft_token>"), tie_word_embeddings=True,
                          architectures=["Gemma3ForConditionalGeneration"])
    images = Gemma3ImageProcessorPil(size={"height": 896, "width": 896}, do_pan_and_scan=False,
                                     image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Gemma3Processor(image_processor=images, tokenizer=tokenizer, chat_template=GEMMA_TEMPLATE,
                                image_seq_length=256)
    return config, Gemma3ForConditionalGeneration, processor


def write_hf(folder, family: str = "llava", shape: str = "tiny", *, seed: int = 0, std: float = 0.2) -> Path:
    """Write a random-weight checkpoint of `family` into `folder` (created) and return its path."""
    import torch

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    if shape not in HF_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(HF_SHAPES)}")
    size = HF_SHAPES[shape]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config, model_class, processor = {
        "llava": lambda: _llava(size, next_=False),
        "llava-next": lambda: _llava(size, next_=True),
        "qwen2.5-vl": lambda: _qwen(size),
        "gemma3": lambda: _gemma(size),
    }[family]()
    config.initializer_range = std
    config.dtype = size.dtype  # what vLLM's --dtype auto loads
    config.get_text_config().initializer_range = std
    torch.manual_seed(seed)
    dtype = getattr(torch, size.dtype)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: a 7B model in float32 would not fit in memory
    try:
        model = model_class(config)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():  # a matrix its init leaves at zero (Gemma 3's projector) would make every image row zero
        for parameter in model.parameters():
            if parameter.ndim >= 2 and not parameter.any():
                parameter.normal_(0.0, std)
    if family == "gemma3":
        # Gemma scales its (tied) token embeddings by sqrt(D): at this std the residual stream would be the
        # last token's embedding, and every answer would repeat it. Smaller embeddings let the layers speak.
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(0.1)
    _save(model, folder)
    del model
    processor.save_pretrained(folder)
    (folder / "trimcpp-testing.json").write_text(json.dumps({"family": family, "shape": shape, "seed": seed}))
    return folder
