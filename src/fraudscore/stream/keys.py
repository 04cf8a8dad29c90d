"""Every Redis key the pipeline uses, and the partition of a customer.  The one owner of key names.

Each partition's keys share the hash tag ``{fs:p<i>}``, so every atomic call (a Redis function
touches one partition's keys only) lands on one slot, as Redis Cluster requires.  The kinds of
key have distinct prefixes (``c:``, ``m:``, ``ev:``), so no id, whatever
characters it holds, can make two keys collide::

    {fs}:meta               hash: partitions (the partition count, fixed when first set)
    {fs}:workers            sorted set: live workers' tokens, scored by heartbeat expiry (ms)
    {fs:p<i>}:events        stream: raw events (field ``event``); consumer group ``scorers``
    {fs:p<i>}:results       stream: one result per event (``worker.RESULT_FIELDS``), capped
    {fs:p<i>}:dead          stream: dead letters (source entry, reason, raw event), capped
    {fs:p<i>}:lease         string: the token of the worker that owns the partition, with a TTL
    {fs:p<i>}:ev:<event>    string: the idempotency record: ``p`` + the state before the event
                            (sums, window count, the customer's packed state as it was) until
                            its result is written, then ``r`` + the result's entry id; TTL
    {fs:p<i>}:c:<customer>  hash: sum (cents), s (msgpack: n, t (last event time, ms), lat/lon
                            (last terminal), hlat/hlon (home), the event times of the 24 h
                            window, the recent merchants); TTL after the customer's last event
    {fs:p<i>}:m:<merchant>  hash: n, sum (cents) of the merchant's events in the partition; TTL
    {fs}:runs               sorted set: the generator's run ids, scored by their start (ms)
    {fs}:run:<run>          hash: a run's settings, start, end and counts (``stream.runs``)
    {fs}:run:<run>:frauds   set: the ids of the run's events made fraudulent (ground truth)
"""

from __future__ import annotations

import zlib

NAMESPACE = "fs"
META = "{fs}:meta"
WORKERS = "{fs}:workers"
RUNS = "{fs}:runs"
RUN = "{fs}:run:"  # + a run id: its hash; + ":frauds": its ground truth
GROUP = "scorers"
# entries read per partition per step: here, not in worker.py, so the command line's default
# needs no import of redis (the worker's own default is this too)
DEFAULT_BATCH = 500


def partition_of(customer_id: str, partitions: int) -> int:
    """The partition of a customer: CRC-32 of its id, so every producer and language agrees.

    >>> partition_of("C-0001", 8), partition_of("C-0001", 1)
    (4, 0)
    """
    return zlib.crc32(customer_id.encode()) % partitions


class PartitionKeys:
    """The key names of one partition."""

    def __init__(self, index: int) -> None:
        self.index = index
        tag = f"{{{NAMESPACE}:p{index}}}"
        self.tag = tag
        self.events = f"{tag}:events"
        self.results = f"{tag}:results"
        self.dead = f"{tag}:dead"
        self.lease = f"{tag}:lease"

    def record(self, event_id: str) -> str:
        return f"{self.tag}:ev:{event_id}"

    def customer(self, customer_id: str) -> str:
        return f"{self.tag}:c:{customer_id}"

    def merchant(self, merchant_id: str) -> str:
        return f"{self.tag}:m:{merchant_id}"


def run_key(run_id: str) -> str:
    """The hash of a generator's run (run ids hold no ``:``, so no two keys collide)."""
    return f"{RUN}{run_id}"


def run_frauds_key(run_id: str) -> str:
    """The set of a run's fraudulent event ids."""
    return f"{RUN}{run_id}:frauds"
