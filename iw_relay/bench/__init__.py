"""iwrelay-bench: a load generator for any relay speaking the iw-relay protocol.

Scenarios (``python -m iw_relay.bench SCENARIO --help``): ``fanout``, ``bigroom``,
``idle``, ``connect``, ``soak``. Loopback targets only; every run is bounded in steps,
step duration and an overall deadline.
"""
