"""The quantize stage's policies driven alone, on a RunContext of a tiny task: what to run
after a full stage went over the budget."""

from __future__ import annotations

import pytest

from deepzip import decide
from deepzip.sharing import Sharing


def _budget(confirmed):
    table = [decide.Option(3, 0.85, 2.5, 36_000, 0.3, 0.6, True),
             decide.Option(3, 0.85, 3.0, 40_000, 0.3, 0.6, True),
             decide.Option(2, 0.7, 2.5, 50_000, 0.1, 0.6, False),
             decide.Option(3, 0.85, 6.0, 60_000, 0.3, 0.6, True)]
    return {"max_loss": 1.0, "options": decide.as_rows(table), "confirmed": confirmed,
            "candidates": [1, 2, 3], "chosen_step": 3, "chosen": 2.5}


def test_a_miss_is_added_to_every_prediction_before_the_next_choice():
    # the full stage at step 3, 2.5 bits measured 0.3 worse than predicted: 0.9 + 0.3
    miss = [{"step": 3, "target_bits": 2.5, "loss": 0.6, "margin": 0.6}]
    nxt = Sharing.next_option(_budget(miss))
    # step 3 at 3 bits is predicted 0.9 + 0.3 = 1.2 now: over; step 2 at 2.5: 0.7 + 0.3
    assert (nxt.step, nxt.bits) == (2, 2.5)


def test_a_small_miss_moves_up_one_budget_on_the_same_step():
    miss = [{"step": 3, "target_bits": 2.5, "loss": 0.35, "margin": 0.6}]
    nxt = Sharing.next_option(_budget(miss))
    assert (nxt.step, nxt.bits) == (3, 3.0)


def test_three_full_stages_are_the_most_before_shipping_unshared():
    tried = [{"step": 3, "target_bits": b, "loss": 0.5, "margin": 0.6}
             for b in (2.5, 3.0, 6.0)]
    assert Sharing.next_option(_budget(tried)) is None


@pytest.mark.parametrize("excess", [0.0, 0.05])
def test_nothing_is_tried_twice(excess):
    miss = [{"step": 3, "target_bits": 2.5, "loss": 0.3 + excess, "margin": 0.6}]
    nxt = Sharing.next_option(_budget(miss))
    assert (nxt.step, nxt.bits) != (3, 2.5)
