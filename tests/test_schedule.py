import pytest

from contrasim_monitor.schedule import EveryNSteps, LogSpaced, resolve_schedule


def test_every_n_steps_selects_multiples():
    schedule = EveryNSteps(3)
    assert [s for s in range(0, 13) if schedule(s)] == [3, 6, 9, 12]


def test_log_spaced_is_dense_early_and_sparse_late():
    schedule = LogSpaced(per_decade=4)
    steps = [s for s in range(0, 1001) if schedule(s)]
    assert steps == [1, 2, 3, 6, 10, 18, 32, 56, 100, 178, 316, 562, 1000]


def test_log_spaced_max_interval_adds_floor():
    schedule = LogSpaced(per_decade=1, max_interval=250)
    steps = [s for s in range(0, 1001) if schedule(s)]
    assert steps == [1, 10, 100, 250, 500, 750, 1000]


def test_resolve_schedule_accepts_int_and_callable():
    assert resolve_schedule(5)(10)
    assert not resolve_schedule(5)(11)

    def custom(step: int) -> bool:
        return step == 7

    assert resolve_schedule(custom) is custom
    assert isinstance(resolve_schedule(None), LogSpaced)


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-1, ValueError), (True, TypeError), (1.5, TypeError), ("10", TypeError), ([2], TypeError)],
)
def test_resolve_schedule_rejects_invalid(value, error):
    with pytest.raises(error, match="schedule"):
        resolve_schedule(value)


@pytest.mark.parametrize("value", [0, -2, 2.0, True])
def test_schedule_classes_reject_invalid(value):
    with pytest.raises(ValueError):
        EveryNSteps(value)
    with pytest.raises(ValueError):
        LogSpaced(per_decade=value)
