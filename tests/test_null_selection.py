"""A few null data sets at the default job's shapes through the benchmark's code: the new rule exports nothing."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def null_selection():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling _common
    try:
        spec = importlib.util.spec_from_file_location("benchmark_null_selection", BENCHMARKS / "null_selection.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("benchmark_null_selection", None)
        sys.path.remove(str(BENCHMARKS))


def test_null_sets_that_fool_the_old_rule_export_nothing_under_holm_and_the_q_filter(null_selection):
    results = [null_selection.one_null_set(seed, null_selection.Shapes()) for seed in range(8)]
    old, holm, new, s, a = (null_selection.RULES[i] for i in (0, 1, 2, 4, 5))
    assert any(exports[old] for exports, _ in results), "some null set fools the uncorrected rule: the test bites"
    assert not any(exports[rule] for exports, _ in results for rule in (holm, new, s, a))
    assert all(smallest >= 0.05 for _, smallest in results), "null calibration: no feature is significant"


def test_null_world_has_the_default_jobs_shapes(null_selection):
    import torch

    shapes = null_selection.Shapes()
    stats = null_selection.null_stats(torch.Generator().manual_seed(0), shapes)
    assert sorted(stats) == [6, 12, 18, 24] and all(s.num_features == 2304 for s in stats.values())
    for s in stats.values():
        assert s.num_samples == 2000 and 40 <= int((s.active > 0).sum()) <= 60
        assert 0.06 < float(s.positive_rate()) < 0.12
        assert 25 < float(s.frequency().sum()) < 35, "TopK-32-like: about 32 latents fire per item"
