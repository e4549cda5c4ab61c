"""EcoServe component (c): time-synced groups (a bucketed waiting queue)."""

from __future__ import annotations

from test_policy_components import req

from ecoserve_scheduler.core.policies.groups import GroupsConfig, SyncedGroups


def test_an_admitted_head_opens_its_bucket_for_group_size_more() -> None:
    q = SyncedGroups(lambda r: (r.arrival_s,), GroupsConfig(group_size=2))
    a, b, c, x = (
        req(n, arrival=t, bucket=k)
        for n, t, k in [("a", 0, 1), ("b", 2, 1), ("c", 3, 1), ("x", 1, 2)]
    )
    for r in (a, b, c, x):
        q.push(r, 0.0)
    assert q.peek(0.0) is a
    q.pop(a)
    assert q.peek(0.0) is b  # a's bucket stays open although x arrived before b
    q.pop(b)
    assert q.peek(0.0) is x  # the group is full (group_size 2): best head again
    q.begin_step()


def test_a_new_step_closes_the_group() -> None:
    q = SyncedGroups(lambda r: (r.arrival_s,))
    a, b, x = (req(n, arrival=t, bucket=k) for n, t, k in [("a", 0, 1), ("b", 2, 1), ("x", 1, 2)])
    for r in (a, b, x):
        q.push(r, 0.0)
    q.pop(a)
    assert q.is_open
    q.begin_step()
    assert not q.is_open and q.peek(0.0) is x
