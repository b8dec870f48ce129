"""The selection benchmark (python -m trimcpp.bench_select): its NumPy side selects what the core
selects, and it reports every case. No timing assertions: the numbers are printed, not tested."""

from __future__ import annotations

import numpy as np

from trimcpp import available_backends, prune
from trimcpp.bench import selection


def test_numpy_side_selects_what_the_core_selects():
    rng = np.random.default_rng(3)
    v = rng.standard_normal((301, 65)).astype(np.float32)
    t = rng.standard_normal((9, 65)).astype(np.float32)
    for keep in (1, 17, 240):
        assert np.array_equal(selection.numpy_trimtokenator(v, t, keep), prune(v, t, keep, alignment="l2"))


def test_run_reports_every_case():
    result = selection.run(repeat=1)
    assert [c["same_selection"] for c in result["cases"]] == [True, True]
    assert sum(result["cases"][1]["budgets"]) == 320
    assert all(c["trimcpp_ms"] > 0 and c["numpy_ms"] > 0 for c in result["cases"])
    assert [row["rows"] for row in result["backends"]] == [576, 1152, 2880]
    assert [row["method"] for row in result["methods"]] == ["trimtokenator+l2", "trimtokenator+cosine", "align+cosine",
                                                             "divprune", "cdpruner"]
    assert all(row["ms"] > 0 for row in result["methods"])
    assert all(row[f"{b}_ms"] > 0 for row in result["backends"] for b in available_backends())
    assert result["machine"]["cores"] >= 1 and result["machine"]["kernels"]
