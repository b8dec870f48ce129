"""trimcpp's vLLM plugin: LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL and Gemma 3 requests reach the LLM with
the image rows trimcpp keeps for their question (README, "vLLM").

vLLM finds it through the ``vllm.general_plugins`` entry point and calls :func:`register` in each
of its processes. Importing this package loads neither vLLM nor torch; ``register`` does.

Settings, per model with ``--hf-overrides '{"trim_keep": 64}'`` (or ``--mm-processor-kwargs``) and per request in
``mm_processor_kwargs`` (``vllm serve --trust-request-mm-kwargs``): ``trim_keep`` (a count, a share
in (0, 1], or 0 for every row), ``trim_method``, ``trim_alignment``, ``trim_stage1_ratio``.
"""

ARCHITECTURES = {
    "LlavaForConditionalGeneration": "trimcpp.vllm.models:TrimLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "trimcpp.vllm.models:TrimLlavaNextForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "trimcpp.vllm.models:TrimQwen2_5_VLForConditionalGeneration",
    "Gemma3ForConditionalGeneration": "trimcpp.vllm.models:TrimGemma3ForConditionalGeneration",
}


def register() -> None:
    """vLLM's plugin hook: put the trimmed models in place of vLLM's own (idempotent)."""
    from vllm import ModelRegistry

    for architecture, target in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, target)
    from .models import enable_position_recompute

    enable_position_recompute()
