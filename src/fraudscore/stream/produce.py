"""Publishing raw events: each to its customer's partition stream, in order, retried on failure.

An event goes to ``{fs:p<i>}:events`` with i = ``partition_of(customer_id)``; bytes that have
no readable ``customer_id`` go to partition 0, where a worker dead-letters them.  Events are sent
in chunks, each chunk as one ``fs_publish`` call per partition (``functions.py``), which adds all
of that partition's events of the chunk or none.  When Redis fails mid-chunk the whole chunk is
sent again, in order, so an event may be in its stream twice, always after its first copy: the
workers recognise the repeat by its event id and apply it once.  (A pipeline of plain XADDs would
not do: Redis can reject its first commands and run the rest, when it finishes loading its data
mid-pipeline, and the chunk sent again would put those first events after later ones.)
``publish_paced`` sends them at the pace of a ``RateShape``.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence

import orjson

from fraudscore.stream.generate import RateShape
from fraudscore.stream.keys import PartitionKeys, partition_of
from fraudscore.stream.worker import MAX_BACKOFF_S, TRANSIENT_ERRORS, Client

log = logging.getLogger("fraudscore.stream")


def partition_of_raw(raw: bytes, partitions: int) -> int:
    """The partition of a raw event, 0 when its customer cannot be read."""
    try:
        customer = orjson.loads(raw).get("customer_id")
    except (orjson.JSONDecodeError, AttributeError):
        return 0
    return partition_of(customer, partitions) if isinstance(customer, str) else 0


def _chunks(items: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def publish(
    client: Client, raws: Iterable[bytes], partitions: int, chunk: int = 500, retries: int = 50
) -> int:
    """XADD every raw event to its partition; the number published.  Retries transient errors.

    The function library must be loaded (``worker.prepare``)."""
    streams = [PartitionKeys(i).events for i in range(partitions)]
    published = 0
    for part in _chunks(raws, chunk):
        routed: dict[int, list[bytes]] = {}
        for raw in part:
            routed.setdefault(partition_of_raw(raw, partitions), []).append(raw)
        backoff = 0.05
        for attempt in range(retries + 1):
            pipe = client.pipeline(transaction=False)
            for index, events in routed.items():
                pipe.fcall("fs_publish", 1, streams[index], *events)
            try:
                pipe.execute()
                break
            except TRANSIENT_ERRORS as exc:
                if attempt == retries:
                    raise
                log.warning("redis: %s; sending the chunk again in %.2f s", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
        published += len(part)
    return published


def publish_paced(
    client: Client,
    raws: Sequence[bytes],
    partitions: int,
    shape: RateShape,
    max_chunk: int = 500,
    stop: threading.Event | None = None,
) -> int:
    """``publish`` each event at its due time by ``shape`` (in chunks of those already due);
    the number sent, fewer when ``stop`` is set first (it is checked at least every 0.1 s)."""
    due = shape.schedule(len(raws))
    start = time.monotonic()
    sent = 0
    while sent < len(raws) and not (stop is not None and stop.is_set()):
        now = time.monotonic() - start
        ready = min(bisect.bisect_right(due, now, lo=sent), sent + max_chunk)
        if ready == sent:
            time.sleep(min(due[sent] - now, 0.1))
            continue
        publish(client, raws[sent:ready], partitions, chunk=max_chunk)
        sent = ready
    return sent
