"""A LLaVA-1.5 in miniature, trained by the project on :mod:`trimcpp.quality.scenes`, for the
quality benchmark. Rebuilding it needs PyTorch (``pip install "trimcpp[train]"``); nothing outside
this package imports PyTorch, and importing this package does not.

    python -P -m trimcpp.quality.minivlm rebuild --out stages/        # every stage, about 4 hours
    python -P -m trimcpp.quality.minivlm train --stage 5 --start stages/stage4 --out trimcpp/quality/data/minivlm
    python -P -m trimcpp.quality.minivlm agree                         # PyTorch vs llama.cpp on the test split
    python -P -m trimcpp.quality.minivlm coverage                      # which methods keep each question's evidence

The architecture is exactly what libmtmd and llama.cpp compute for a LLaVA-1.5 GGUF pair, so the
exported files load unchanged:

- vision: 14-pixel patches of a 224-pixel picture (256 rows), a CLIP ViT without class token
  (position embeddings, pre-layernorm, pre-norm blocks with biases and quick-GELU MLPs), then the
  ``mlp`` projector (linear, tanh-GELU, linear). libmtmd runs every layer of the file but the last,
  so the mmproj carries one unused layer more than the model has.
- LLM: llama (RMSNorm, rotary positions in ggml's "normal" pairing, SwiGLU), with the generated
  vocabulary of :mod:`trimcpp.testing`.

Modules: :mod:`.stages` (the dimensions and the named training stages), :mod:`.coverage` (which
rows each method keeps of the evidence) and :mod:`.__main__` need no PyTorch; :mod:`.model` (the
network and its GGUF export), :mod:`.template` (the stock handler's token sequence, from libmtmd),
:mod:`.train` (batches, losses, the training loop) and :mod:`.agree` (PyTorch vs llama.cpp) do.
"""
