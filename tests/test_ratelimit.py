from iw_relay.ratelimit import TokenBucket


def test_default_burst_is_the_original_fixed_window():
    limiter = TokenBucket.rule(3, 1.0)(10.0)
    assert [limiter.allow(10.1) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow(10.99) is False
    # The window started when the connection opened (10.0), so it ends at 11.0, and the
    # whole allowance is back, not more (the bucket holds `limit` tokens).
    assert [limiter.allow(11.0) for _ in range(4)] == [True, True, True, False]


def test_a_burst_of_150_lets_exactly_100_through_and_the_allowance_returns():
    limiter = TokenBucket.rule(100, 1.0)(0.0)
    assert sum(limiter.allow(0.5) for _ in range(150)) == 100
    assert sum(limiter.allow(1.5) for _ in range(150)) == 100


def test_new_window_starts_at_the_first_message_after_the_last_one_ended():
    limiter = TokenBucket.rule(2, 1.0)(0.0)
    assert limiter.allow(5.5) is True  # long idle: a window starts at 5.5
    assert limiter.allow(6.4) is True
    assert limiter.allow(6.49) is False
    assert limiter.allow(6.5) is True  # 5.5 + 1.0


def test_a_larger_burst_saves_unused_allowance_up_to_the_burst():
    limiter = TokenBucket.rule(100, 1.0, 300)(0.0)
    assert sum(limiter.allow(0.1) for _ in range(160)) == 160  # a reconnect flush
    assert sum(limiter.allow(0.2) for _ in range(200)) == 140  # 300 - 160
    # Two quiet windows refill 200, the third is capped at the burst.
    assert sum(limiter.allow(3.2) for _ in range(400)) == 300


def test_first_refusal_only_once_per_window():
    limiter = TokenBucket.rule(1, 1.0)(0.0)
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


def test_overdrawn_after_refusing_as_many_as_the_limit():
    limiter = TokenBucket.rule(3, 1.0)(0.0)
    flags = []
    for _ in range(6):
        limiter.allow(0.3)
        flags.append(limiter.overdrawn)
    assert flags == [False, False, False, False, False, True]
    assert limiter.window_end == 1.0


def flood_window(limiter, start, count):
    for _ in range(count):
        limiter.allow(start)


def test_flood_windows_add_up_and_quiet_windows_pay_them_back():
    limiter = TokenBucket.rule(3, 1.0)(0.0)
    for second in range(3):
        flood_window(limiter, second, 5)
    assert limiter.flooded_windows == 3
    flood_window(limiter, 3, 2)   # within the limit
    flood_window(limiter, 4, 2)
    assert limiter.flooded_windows == 2  # (the window at 4 is not over yet)
    flood_window(limiter, 5, 1)
    assert limiter.flooded_windows == 1


def test_pause_and_burst_does_not_reset_the_flood_count():
    """Bursts of 3 windows, pauses of 2.2: each cycle adds 3 and pays back 2."""
    limiter = TokenBucket.rule(3, 1.0)(0.0)
    start = 0.0
    counts = []
    for _ in range(4):
        for second in range(3):
            flood_window(limiter, start + second, 10)
        counts.append(limiter.flooded_windows)
        start += 3 + 2.2
    assert counts == [3, 4, 5, 6]


def test_an_idle_stretch_pays_back_one_window_each():
    limiter = TokenBucket.rule(3, 1.0)(0.0)
    for second in range(4):
        flood_window(limiter, second, 5)
    assert limiter.flooded_windows == 4
    limiter.allow(7.0)  # windows 4-5, 5-6, 6-7 idle (the one at 3 was over)
    assert limiter.flooded_windows == 1


def test_a_bucket_holds_only_its_own_state():
    bucket = TokenBucket.rule(100, 1.0)(0.0)
    assert not hasattr(bucket, "__dict__")
    assert (bucket.limit, bucket.window, bucket.burst) == (100, 1.0, 100)
