"""EcoServe component (c): slack estimates, slack ordering with a late queue, slack victims."""

from __future__ import annotations

import math

from test_policy_components import req, step_of

from ecoserve_scheduler.core import Status
from ecoserve_scheduler.core.policies.slack import (
    ArrivalOrder,
    Slack,
    SlackConfig,
    SlackOrder,
    SlackVictim,
)
from ecoserve_scheduler.core.queues import FifoQueue


def test_latest_start_uses_the_measured_iteration_time_else_the_default() -> None:
    slack = Slack(SlackConfig(default_iter_s=0.1))
    r = req("a", prompt=100, predicted=9, deadline=10.0)
    assert slack.latest_start(r, 0.0, budget=512) == 10.0 - 10 * 0.1
    assert slack.latest_start(r, 0.2, budget=512) == 10.0 - 10 * 0.2
    assert slack.latest_start(req("b"), 0.0) == math.inf
    assert slack.slack_class(3.7) == 3 and slack.slack_class(math.inf) == math.inf


def test_urgent_first_and_late_requests_after_on_time_ones() -> None:
    order = SlackOrder(Slack())
    late = req("late", predicted=10, deadline=0.5)
    relaxed = req("relaxed", predicted=10, deadline=100.0)
    urgent = req("urgent", predicted=10, deadline=5.0)
    for r in (late, relaxed, urgent):
        order.push(r, 1.0, 0.0)
    got = []
    while (head := order.peek(1.0)) is not None:
        order.pop(head)
        head.status = Status.RUNNING
        got.append(head.request_id)
    assert got == ["urgent", "relaxed", "late"]
    for r in (late, relaxed, urgent):
        order.on_done(r)
    assert not order._latest and not order._late_ids


def test_a_head_that_turns_late_moves_to_the_late_queue() -> None:
    order = SlackOrder(Slack())
    a, b = req("a", deadline=2.0), req("b", deadline=50.0)
    order.push(a, 0.0, 0.0)
    order.push(b, 0.0, 0.0)
    assert order.peek(0.0) is a
    assert order.peek(5.0) is b  # a can no longer make it
    order.pop(b)
    b.status = Status.RUNNING
    assert order.peek(5.0) is a
    order.pop(a)


def test_victim_is_the_running_request_with_most_slack() -> None:
    s = step_of()
    for rid, deadline in [("tight", 5.0), ("loose", 500.0), ("mid", 50.0)]:
        s.running[rid] = req(rid, deadline=deadline)
    assert SlackVictim(Slack()).victim(s, s.running["tight"]) is s.running["loose"]


def test_arrival_order_requeues_at_the_back() -> None:
    order = ArrivalOrder(FifoQueue())
    a, b = req("a"), req("b")
    order.push(a, 0.0, 0.0)
    order.push(b, 0.0, 0.0)
    order.pop(a)
    order.requeue(a, 0.0, 0.0)
    assert order.peek(0.0) is b
