"""The transactional outbox of the product files: messages written with the chunk that staged them, a batch of
messages per outbox row, published to the Redis stream after the commit, then marked published.

Publishing is exactly once, whenever it happens: an outbox row (a batch of messages) is claimed (`FOR UPDATE
SKIP LOCKED`, so two publishers never take the same row at once), its messages added through `StreamPublisher`
in one script call (which adds a message key only once while the key is guarded), and the row marked in the
same transaction as the claim; once that commit is done the batch's guards are dropped, since a marked row is
never claimed again. A crash anywhere leaves the row unpublished, or the stream already holding its messages
with their guards kept (guards have no expiry); the next publish, however late (the run's final publish, the
`publish-outbox` relay a minute later, or one a month later), completes them without a second entry.
`sweep_guards` drops the guards a publisher that died between its commit and their removal left; it keeps
every guard whose row is still unmarked.

Publishers stop between batches when `should_stop()` (a cancelled run): the batches done stay published and
counted in `counts`, which the caller may keep across a task's attempts.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, text

from operations.cancellation import StopCheck, never, raise_if_stopped
from operations.infra.redis_stream import EncodedMessages, StreamPublisher

# One outbox row a claim: a batch of messages as the chunk's statement encoded them (operations/products/store.py),
# their keys and count, so no Python object is made per message but the keys the guards are dropped by.
_CLAIM = """
SELECT id, message_count, message_keys, messages FROM outbox_batches
WHERE published_at IS NULL AND stream = :stream {only}
ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED
"""
_FIELDS = ("message_key", "type", "outbox_id", "payload")  # the stream entry's fields, as the chunk encoded them
_CLAIM_ANY = text(_CLAIM.format(only=""))
_CLAIM_IDS = text(_CLAIM.format(only="AND id = ANY(CAST(:ids AS bigint[]))"))
_MARK = text("UPDATE outbox_batches SET published_at = now(), entry_ids = :entry_ids WHERE id = :id")
_STILL_UNMARKED = text("""
SELECT k.key FROM outbox_batches b CROSS JOIN LATERAL unnest(string_to_array(b.message_keys, ',')) AS k(key)
WHERE b.published_at IS NULL AND b.stream = :stream AND k.key = ANY(CAST(:keys AS text[]))
""")
_BACKLOG = text("""
SELECT coalesce(sum(message_count), 0), min(created_at), now() FROM outbox_batches
WHERE published_at IS NULL AND stream = :stream
""")


@dataclass
class PublishCounts:
    published: int = 0          # added to the stream now
    already_in_stream: int = 0  # added by an earlier attempt that crashed before marking them

    def add(self, other: PublishCounts) -> None:
        self.published += other.published
        self.already_in_stream += other.already_in_stream

    @property
    def total(self) -> int:
        """Messages marked published: added now, or found in the stream from an earlier attempt."""
        return self.published + self.already_in_stream


def publish_outbox(
    engine: Engine, publisher: StreamPublisher, ids: list[int] | None = None, *,
    should_stop: StopCheck = never, counts: PublishCounts | None = None,
) -> PublishCounts:
    """Publish the unpublished messages of `publisher.stream` (only those of the outbox rows `ids` when given), a
    row (a batch of messages) at a time in id order, adding each committed batch to `counts` (returned). Rows
    another publisher holds at the moment are left to it. Raises `Cancelled` before a batch once
    `should_stop()`."""
    counts = PublishCounts() if counts is None else counts
    if ids is not None and not ids:
        return counts
    claim = _CLAIM_ANY if ids is None else _CLAIM_IDS
    parameters = {"stream": publisher.stream} if ids is None else {"stream": publisher.stream, "ids": list(ids)}
    while True:
        raise_if_stopped(should_stop, "the next batch of messages")
        with engine.begin() as conn:
            row = conn.execute(claim, parameters).one_or_none()
            if row is None:
                return counts
            batch_id, claimed, keys, messages = row
            result = publisher.publish(EncodedMessages(_FIELDS, messages, claimed))
            conn.execute(_MARK, {"id": batch_id, "entry_ids": result.entry_ids})
        added = result.added_now
        counts.add(PublishCounts(added, claimed - added))
        publisher.forget(keys.split(","))  # marked: never claimed again (the sweep covers a crash here)


def sweep_guards(engine: Engine, publisher: StreamPublisher) -> int:
    """Drop the guards of messages whose outbox row is marked published (or gone): those a publisher left when
    it died between its commit and `forget`. Guards of unmarked rows stay. Returns how many were dropped."""
    dropped = 0
    for keys in publisher.guarded_keys():
        with engine.connect() as conn:
            unmarked = {key for (key,) in conn.execute(_STILL_UNMARKED, {"stream": publisher.stream, "keys": keys})}
        dropped += publisher.forget(key for key in keys if key not in unmarked)
    return dropped


@dataclass(frozen=True)
class Backlog:
    """The unpublished messages of a stream: how many, and how long the oldest has waited."""

    unpublished: int
    oldest_minutes: float

    def stale(self, minutes: float) -> bool:
        return self.unpublished > 0 and self.oldest_minutes > minutes


def outbox_backlog(engine: Engine, stream: str) -> Backlog:
    """How many messages of `stream` are unpublished, and the age of the oldest (by the database's clock)."""
    with engine.connect() as conn:
        count, oldest, now = conn.execute(_BACKLOG, {"stream": stream}).one()
    age = (now - oldest).total_seconds() / 60 if oldest is not None else 0.0
    return Backlog(int(count), round(max(0.0, age), 1))
