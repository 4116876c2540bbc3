"""The numbers deepzip reports (deepzip.report): the Pareto front, a run's summary."""

import copy

import pytest

from deepzip.report import pareto_front, run_summary


def test_pareto_front():
    pts = [(7.3, 92.0), (12.5, 91.6), (10.0, 91.0), (31.0, 91.5), (50.0, 90.2), (40.0, 90.0)]
    assert pareto_front(pts) == [(7.3, 92.0), (12.5, 91.6), (31.0, 91.5), (50.0, 90.2)]
    assert pareto_front([]) == []


def _state(**quantize):
    layer = {"name": "fc.weight", "params": 100, "nonzero": 20, "clusters": 4}
    return {"stages": {
        "baseline": {"score": 0.9}, "prune": {"score": 0.89, "sparsity": 0.85},
        "quantize": {"score": 0.88, **quantize},
        "encode": {"tensors": [layer], "huffman_avg": 2.0, "formula_ratio": 50.0,
                   "file_bytes": 1000, "state_dict_bytes": 40_000, "real_ratio": 40.0,
                   "params": 10_000},
        "verify": {"score": 0.88, "examples": 100, "identical": True,
                   "same_predictions": 100}}}


def test_a_run_summary_leaves_the_run_state_as_it_was():
    state = _state()
    before = copy.deepcopy(state)
    report = run_summary("r", state)
    assert state == before  # the per-layer sparsity is added to the report's copy
    assert report["stages"]["encode"]["tensors"][0]["sparsity"] == 0.8
    assert report["summary"]["loss_points"] == pytest.approx(2.0)
    assert report["summary"]["sparsity"] == 0.85  # the pruned model is what ships


def test_the_summary_gives_the_sparsity_of_the_model_the_file_ships():
    """With prune.keep_steps the file may ship a less sparse step than the one the
    prune stage ended with: the quantize stage records it, and the summary reads it."""
    report = run_summary("r", _state(sparsity=0.75, step=4))
    assert report["summary"]["sparsity"] == 0.75
