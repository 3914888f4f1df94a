"""Retention is a pure policy over (step, time, metrics) records: no files, no manager."""

from __future__ import annotations

import functools
import math
import random

import pytest

from torchkeep.retention import Policy, Record, best, retained


def _records(*steps: int, **metrics_by_step: dict[str, float]) -> list[Record]:
    return [Record(s, float(s), metrics_by_step.get(f"s{s}", {})) for s in steps]


def _scored(values: dict[int, float | None], metric: str = "loss") -> list[Record]:
    """Records whose ``metric`` is ``values[step]`` (None: the record lacks the metric)."""
    return [
        Record(s, 1000.0 + s, {} if v is None else {metric: v}) for s, v in sorted(values.items())
    ]


STEPS = [10, 20, 30, 40, 50]

# ---------------------------------------------------------------------------------------------
# keep_last


@pytest.mark.parametrize(
    ("keep_last", "expected"),
    [
        (0, {50}),  # the newest is kept even with 0
        (1, {50}),
        (3, {30, 40, 50}),
        (5, {10, 20, 30, 40, 50}),
        (9, {10, 20, 30, 40, 50}),  # more than there are records
        (None, {10, 20, 30, 40, 50}),  # None keeps every step
    ],
)
def test_keep_last(keep_last, expected):
    assert retained(_records(*STEPS), Policy(keep_last=keep_last)) == expected


def test_keep_last_ranks_by_step_not_by_input_order_or_time():
    # Written out of order, and with times that disagree with the steps.
    records = [Record(30, 1.0), Record(10, 3.0), Record(50, 0.0), Record(20, 5.0), Record(40, 2.0)]
    assert retained(records, Policy(keep_last=2)) == {40, 50}
    assert retained(reversed(records), Policy(keep_last=2)) == {40, 50}


def test_no_records_keep_nothing():
    assert retained([], Policy()) == set()
    assert retained([], Policy(keep_last=None)) == set()
    assert retained(iter([]), Policy(keep_best=2, monitor="loss")) == set()


def test_single_record_is_kept_whatever_the_policy():
    for policy in (Policy(keep_last=0), Policy(keep_last=0, keep_best=1, monitor="loss")):
        assert retained([Record(7)], policy) == {7}


def test_retained_accepts_a_generator():
    assert retained((r for r in _records(*STEPS)), Policy(keep_last=2)) == {40, 50}


def test_default_policy_keeps_the_last_three():
    assert Policy() == Policy(keep_last=3, keep_best=0, monitor=None, mode="min", keep_every=None)
    assert retained(_records(*STEPS), Policy()) == {30, 40, 50}


@pytest.mark.parametrize("keep_last", [0, 1, 2, 5, None])
def test_newest_always_kept(keep_last):
    # The newest has the worst metric and is no milestone: it is kept anyway.
    records = _scored({1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 7: 9.0})
    policy = Policy(keep_last=keep_last, keep_best=1, monitor="loss", keep_every=2)
    assert 7 in retained(records, policy)


# ---------------------------------------------------------------------------------------------
# keep_best


@pytest.mark.parametrize(
    ("mode", "keep_best", "expected"),
    [
        ("min", 1, {20, 50}),
        ("min", 2, {20, 40, 50}),
        ("min", 3, {10, 20, 40, 50}),
        ("max", 1, {30, 50}),
        ("max", 2, {30, 50}),  # the second best is the newest
        ("max", 3, {30, 50, 10}),
        ("min", 9, {10, 20, 30, 40, 50}),  # more than there are records
    ],
)
def test_keep_best(mode, keep_best, expected):
    records = _scored({10: 0.5, 20: 0.1, 30: 0.9, 40: 0.3, 50: 0.7})
    policy = Policy(keep_last=0, keep_best=keep_best, monitor="loss", mode=mode)
    assert retained(records, policy) == expected


@pytest.mark.parametrize(
    ("mode", "values"),
    [
        ("min", {10: 0.5, 20: 0.2, 30: 0.2, 40: 0.2, 50: 0.5}),
        ("max", {10: 0.1, 20: 0.8, 30: 0.8, 40: 0.8, 50: 0.1}),
    ],
)
def test_ties_the_newer_step_wins(mode, values):
    records = _scored(values)
    policy = Policy(keep_last=0, keep_best=1, monitor="loss", mode=mode)
    assert retained(records, policy) == {40, 50}
    assert [r.step for r in best(records, policy)][:3] == [40, 30, 20]
    policy = Policy(keep_last=0, keep_best=2, monitor="loss", mode=mode)
    assert retained(records, policy) == {30, 40, 50}


def test_ties_are_broken_by_step_not_by_input_order():
    records = _scored({10: 0.2, 20: 0.2, 30: 0.2, 99: 1.0})
    policy = Policy(keep_last=0, keep_best=1, monitor="loss")
    assert retained(records, policy) == {30, 99}
    assert retained(list(reversed(records)), policy) == {30, 99}


@pytest.mark.parametrize(
    "bad",
    [
        None,  # the metric is missing
        math.nan,
        "0.0",
        True,  # a bool is not a number here
        [0.0],
    ],
)
@pytest.mark.parametrize("mode", ["min", "max"])
def test_records_without_a_usable_metric_are_never_best(bad, mode):
    # Step 20 would win in either mode if its value counted as a number (0.0 or True == 1).
    records = [
        Record(10, 0.0, {"loss": 0.5}),
        Record(20, 0.0, {} if bad is None else {"loss": bad}),
        Record(30, 0.0, {"loss": 0.6}),
        Record(40, 0.0, {"loss": 0.55}),
    ]
    policy = Policy(keep_last=0, keep_best=1, monitor="loss", mode=mode)
    winner = 10 if mode == "min" else 30
    assert retained(records, policy) == {winner, 40}
    assert 20 not in [r.step for r in best(records, policy)]


def test_nan_never_best_even_when_every_other_record_is_worse():
    records = [Record(1, 0.0, {"acc": math.nan}), Record(2, 0.0, {"acc": 0.1}), Record(3)]
    for mode in ("min", "max"):
        policy = Policy(keep_last=0, keep_best=1, monitor="acc", mode=mode)
        assert [r.step for r in best(records, policy)] == [2]
        assert retained(records, policy) == {2, 3}


def test_keep_best_ranks_by_the_monitored_metric_only():
    records = [
        Record(1, 0.0, {"loss": 0.9, "acc": 0.9}),
        Record(2, 0.0, {"loss": 0.1, "acc": 0.1}),
        Record(3, 0.0, {"loss": 0.5}),
    ]
    assert retained(records, Policy(keep_last=0, keep_best=1, monitor="loss")) == {2, 3}
    assert retained(records, Policy(keep_last=0, keep_best=1, monitor="acc", mode="max")) == {1, 3}
    # A metric no record has: only the newest.
    assert retained(records, Policy(keep_last=0, keep_best=2, monitor="bleu")) == {3}


def test_integer_and_infinite_metrics_rank_as_numbers():
    records = [
        Record(1, 0.0, {"loss": 3}),
        Record(2, 0.0, {"loss": -math.inf}),
        Record(3, 0.0, {"loss": 2.5}),
        Record(4, 0.0, {"loss": 7}),
    ]
    policy = Policy(keep_last=0, keep_best=4, monitor="loss")
    assert [r.step for r in best(records, policy)] == [2, 3, 1, 4]


def test_best_without_monitor_is_empty():
    assert best(_scored({1: 0.1, 2: 0.2}), Policy()) == []


def test_best_ranks_best_first():
    records = _scored({1: 0.4, 2: 0.1, 3: None, 4: 0.3, 5: math.nan})
    assert [r.step for r in best(records, Policy(monitor="loss"))] == [2, 4, 1]
    assert [r.step for r in best(records, Policy(monitor="loss", mode="max"))] == [1, 4, 2]


def test_monitor_without_keep_best_keeps_no_extra_step():
    records = _scored({10: 0.1, 20: 0.5, 30: 0.9})
    assert retained(records, Policy(keep_last=1, monitor="loss")) == {30}


# ---------------------------------------------------------------------------------------------
# keep_every


@pytest.mark.parametrize(
    ("keep_every", "expected"),
    [
        (1, {100, 150, 200, 250, 300, 333}),  # every step is a multiple of 1
        (100, {100, 200, 300, 333}),
        (150, {150, 300, 333}),
        (1000, {333}),  # no milestone yet: only the newest
        (None, {333}),
    ],
)
def test_keep_every_milestones(keep_every, expected):
    records = _records(100, 150, 200, 250, 300, 333)
    assert retained(records, Policy(keep_last=0, keep_every=keep_every)) == expected


def test_milestones_are_kept_however_old():
    records = _records(*range(1, 1001))
    kept = retained(records, Policy(keep_last=2, keep_every=250))
    assert kept == {250, 500, 750, 1000, 999}


# ---------------------------------------------------------------------------------------------
# combinations


def test_keep_last_best_and_every_combine_as_a_union():
    values = {s: (0.05 if s == 3 else 1.0 / s) for s in range(1, 13)}
    records = _scored(values)
    policy = Policy(keep_last=2, keep_best=2, monitor="loss", keep_every=5)
    # last 2: 11, 12; best 2 by min loss: 3 (0.05), then 12 (1/12); milestones: 5, 10.
    assert retained(records, policy) == {11, 12, 3, 5, 10}


def test_best_already_among_the_last_does_not_pull_in_another():
    records = _scored({1: 0.9, 2: 0.8, 3: 0.1})
    policy = Policy(keep_last=1, keep_best=1, monitor="loss")
    assert retained(records, policy) == {3}


def test_keep_last_none_keeps_everything_whatever_else_is_set():
    records = _scored({1: 0.9, 2: math.nan, 3: None, 4: 0.1})
    policy = Policy(keep_last=None, keep_best=1, monitor="loss", mode="max", keep_every=3)
    assert retained(records, policy) == {1, 2, 3, 4}


def test_policy_and_records_are_frozen():
    policy = Policy()
    with pytest.raises(AttributeError):
        policy.keep_last = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        Record(1).step = 2  # type: ignore[misc]


def test_retained_does_not_change_its_input():
    records = _scored({3: 0.3, 1: 0.1, 2: 0.2})
    snapshot = list(records)
    retained(records, Policy(keep_last=1, keep_best=1, monitor="loss"))
    assert records == snapshot


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep_last": -1}, r"keep_last must be 0 or more.*-1"),
        ({"keep_last": -10}, r"keep_last must be 0 or more.*-10"),
        ({"keep_best": -1, "monitor": "loss"}, r"keep_best must be 0 or more.*-1"),
        ({"keep_best": -1}, r"keep_best must be 0 or more"),
        ({"keep_best": 1}, r"keep_best needs monitor="),
        ({"keep_best": 2, "monitor": ""}, r"keep_best needs monitor="),
        ({"mode": "maximum"}, r"mode must be 'min' or 'max', not 'maximum'"),
        ({"mode": "MIN"}, r"mode must be 'min' or 'max'"),
        ({"mode": None}, r"mode must be 'min' or 'max', not None"),
        ({"keep_every": 0}, r"keep_every must be 1 or more, not 0"),
        ({"keep_every": -5}, r"keep_every must be 1 or more, not -5"),
    ],
)
def test_policy_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Policy(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_last": 0},
        {"keep_last": None},
        {"keep_best": 0, "monitor": None},
        {"monitor": "loss"},  # a monitor alone ranks best_step without keeping extra steps
        {"keep_best": 3, "monitor": "acc", "mode": "max"},
        {"keep_every": 1},
    ],
)
def test_valid_policies(kwargs):
    Policy(**kwargs)


# ---------------------------------------------------------------------------------------------
# property-style: invariants over many random record sets


def _oracle(records: list[Record], policy: Policy) -> set[int]:
    """The retained set computed independently, by brute force, from the documented rules."""
    steps = {r.step for r in records}
    if not steps:
        return set()
    if policy.keep_last is None:
        return steps
    newest = max(steps)
    last = set(sorted(steps, reverse=True)[: policy.keep_last])
    milestones = {s for s in steps if policy.keep_every and s % policy.keep_every == 0}

    def usable(r: Record) -> bool:
        v = r.metrics.get(policy.monitor or "")
        return type(v) in (int, float) and not math.isnan(v)

    def better(a: Record, b: Record) -> int:  # negative: a ranks first
        va, vb = a.metrics[policy.monitor], b.metrics[policy.monitor]  # type: ignore[index]
        if va != vb:
            return -1 if (va < vb) == (policy.mode == "min") else 1
        return -1 if a.step > b.step else 1

    ranked = sorted(filter(usable, records), key=functools.cmp_to_key(better))
    top = {r.step for r in ranked[: policy.keep_best]}
    return {newest} | last | top | milestones


def _random_case(rng: random.Random) -> tuple[list[Record], Policy]:
    n = rng.randint(0, 25)
    steps = rng.sample(range(0, 200), n)
    pool = [0.1, 0.2, 0.3]  # few distinct values: ties are common

    def value() -> object:
        roll = rng.random()
        if roll < 0.15:
            return math.nan
        if roll < 0.25:
            return None
        if roll < 0.5:
            return rng.choice(pool)
        return rng.uniform(-1.0, 1.0)

    records = []
    for s in steps:
        v = value()
        metrics = {"other": rng.random()}
        if v is not None:
            metrics["m"] = v
        records.append(Record(s, rng.uniform(0, 1e9), metrics))
    keep_best = rng.choice([0, 0, 1, 2, 4])
    policy = Policy(
        keep_last=rng.choice([None, 0, 1, 2, 3, 10, 30]),
        keep_best=keep_best,
        monitor="m" if keep_best or rng.random() < 0.5 else None,
        mode=rng.choice(["min", "max"]),
        keep_every=rng.choice([None, None, 1, 7, 50]),
    )
    return records, policy


@pytest.mark.parametrize("seed", range(40))
def test_random_record_sets_keep_the_invariants(seed):
    rng = random.Random(seed)
    for _ in range(25):
        records, policy = _random_case(rng)
        kept = retained(records, policy)
        steps = {r.step for r in records}
        assert kept <= steps
        if not records:
            assert kept == set()
            continue
        assert max(steps) in kept
        if policy.keep_last is None:
            assert kept == steps
            continue
        milestones = sum(1 for s in steps if policy.keep_every and s % policy.keep_every == 0)
        assert len(kept) <= max(policy.keep_last, 1) + policy.keep_best + milestones
        assert set(sorted(steps)[-policy.keep_last :] if policy.keep_last else []) <= kept
        usable = [
            r
            for r in records
            if isinstance(r.metrics.get("m"), float) and not math.isnan(r.metrics["m"])
        ]
        if policy.keep_best >= 1 and usable:
            sign = 1 if policy.mode == "min" else -1
            top = min(sign * r.metrics["m"] for r in usable)
            winner = max(r.step for r in usable if sign * r.metrics["m"] == top)
            assert winner in kept
            assert best(records, policy)[0].step == winner
        assert kept == _oracle(records, policy), (records, policy)
