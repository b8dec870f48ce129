"""PyTorch against llama.cpp on an exported pair: the same greedy answers, question by question."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ...images import image_messages
from ..evaluate import load, normalise
from .coverage import trimmed_llama
from .model import MiniVLM, load_gguf
from .template import Template
from .train import predict


def agree(out: Path, data: Path) -> dict:
    """PyTorch's answers vs llama.cpp's (TrimLlava15ChatHandler, keep=None, greedy) on a split, both
    scored with :func:`trimcpp.quality.evaluate.normalise`, as ``trimcpp eval`` scores."""
    model = MiniVLM()
    if (out / "minivlm.pt").exists():
        model.load_state_dict(torch.load(out / "minivlm.pt"))
    else:  # the bundled pair ships without its checkpoint: the GGUF weights are all inference needs
        load_gguf(model, out)
    model.eval()
    template = Template(str(out / "llm.gguf"), str(out / "mmproj.gguf"))
    before = torch.tensor(template.before)
    questions = load(data)
    _, llama = trimmed_llama(out)
    same = torch_right = cpp_right = 0
    for q in questions:
        [[mine]] = predict(model, template, [(Image.open(q.image), [q.question])], before)
        mine = normalise(mine)
        reply = llama.create_chat_completion(messages=image_messages(q.image.read_bytes(), q.question),
                                             max_tokens=3, temperature=0.0)
        theirs = normalise(reply["choices"][0]["message"]["content"] or "")
        same += mine == theirs
        torch_right += mine == q.answer
        cpp_right += theirs == q.answer
    n = len(questions)
    return {"questions": n, "agreement": same / n, "pytorch_accuracy": torch_right / n, "llama_cpp_accuracy": cpp_right / n}
