"""The streaming pipeline on Redis: raw card events in, one scored result per event out.

- ``events``     the raw event's schema, the state before an event, the contract payload
- ``keys``       every Redis key name, and the partition of a customer
- ``functions``  the Redis function library (Lua): each step one atomic, fenced call
- ``worker``     the worker loop (leases, recovery, batches, dead letters, retries)
- ``produce``    publishing raw events to their partition streams
- ``replay``     the single-threaded oracle the workers must agree with
- ``monitor``    rates, backlog, latency and approvals, read from Redis
- ``generate``   a small deterministic event generator, and the producers' rate shapes
- ``demo``       ``fraudscore pipeline demo``: the whole pipeline here, watched live
- ``demo_report`` the demo's report and chart
- ``compose``    renders deploy/stream/docker-compose.yml
- ``cli``        ``fraudscore worker``, ``publish``, ``monitor`` and ``pipeline demo``

The repository's README.md ("The streaming pipeline") describes the design and lists every key.
"""
