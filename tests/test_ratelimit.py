from iw_relay.ratelimit import FixedWindowLimiter


def test_limit_within_a_window_then_a_new_window():
    limiter = FixedWindowLimiter(limit=3, window=1.0, now=10.0)
    assert [limiter.allow(10.1) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow(10.99) is False
    # The window started when the connection opened (10.0), so it ends at 11.0.
    assert limiter.allow(11.0) is True


def test_new_window_starts_at_the_first_message_after_the_last_one_ended():
    limiter = FixedWindowLimiter(limit=2, window=1.0, now=0.0)
    assert limiter.allow(5.5) is True  # long idle: a window starts at 5.5
    assert limiter.allow(6.4) is True
    assert limiter.allow(6.49) is False
    assert limiter.allow(6.5) is True  # 5.5 + 1.0


def test_first_refusal_only_once_per_window():
    limiter = FixedWindowLimiter(limit=1, window=1.0, now=0.0)
    limiter.allow(0.1)
    refusals = []
    for _ in range(3):
        limiter.allow(0.2)
        refusals.append(limiter.first_refusal)
    assert refusals == [True, False, False]
    limiter.allow(1.5)
    assert limiter.first_refusal is False
    limiter.allow(1.6)
    assert limiter.first_refusal is True
