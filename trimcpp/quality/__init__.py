"""The quality benchmark: accuracy as image rows are dropped, on a VLM small enough to train here.

- :mod:`.scenes`: seeded pictures of coloured figures and one-word questions about them;
- :mod:`.evaluate`: datasets (a folder + ``questions.json``), answer scoring, the ``trimcpp eval`` run;
- :mod:`.minivlm`: the mini LLaVA-1.5 the project trains (PyTorch: ``pip install "trimcpp[train]"``),
  its named training stages and the checks of the exported pair;
- ``data/``: the trained pair (``minivlm/``) and the test split (``scenes-test/``).
"""
