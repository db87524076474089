"""The transactional outbox of the product files: messages written with the chunk that staged them, published
to the Redis stream after the commit, then marked published.

Publishing is exactly once, whenever it happens: a batch of messages is claimed (`FOR UPDATE SKIP LOCKED`, so
two publishers never take the same row at once), added through `StreamPublisher` (which adds a message key
only once while the key is guarded), and marked in the same transaction as the claim; once that commit is
done the batch's guards are dropped, since a marked row is never claimed again. A crash anywhere leaves the
rows unpublished, or the stream already holding them with their guards kept (guards have no expiry); the next
publish, however late (the run's final publish, the `publish-outbox` relay a minute later, or one a month
later), completes them without a second entry. `sweep_guards` drops the guards a publisher that died between
its commit and their removal left; it keeps every guard whose row is still unmarked.

Publishers stop between batches when `should_stop()` (a cancelled run): the batches done stay published and
counted in `counts`, which the caller may keep across a task's attempts.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, text

from operations.cancellation import StopCheck, never, raise_if_stopped
from operations.infra.redis_stream import EncodedMessages, StreamPublisher

# One row per batch: the claimed ids, their message keys and the messages as the stream publisher's JSON array
# (operations/infra/redis_stream.py, EncodedMessages), so no Python object is made per message.
_CLAIM = """
WITH claimed AS (
    SELECT id, message_key, message_type, payload FROM outbox_messages
    WHERE published_at IS NULL AND stream = :stream {only}
    ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED
)
SELECT count(*), coalesce(array_agg(id ORDER BY id), '{{}}'), coalesce(array_agg(message_key ORDER BY id), '{{}}'),
       coalesce(json_agg(json_build_array(message_key, message_key, message_type, id::text, payload::text)
                         ORDER BY id), '[]')::text
FROM claimed
"""
_FIELDS = ("message_key", "type", "outbox_id", "payload")  # the stream entry's fields, as the claim builds them
_CLAIM_ANY = text(_CLAIM.format(only=""))
_CLAIM_IDS = text(_CLAIM.format(only="AND id = ANY(CAST(:ids AS bigint[]))"))
_MARK = text("""
UPDATE outbox_messages SET published_at = now(), stream_entry_id = m.entry_id
FROM unnest(CAST(:ids AS bigint[]), string_to_array(:entry_ids, ',')) AS m(id, entry_id)
WHERE outbox_messages.id = m.id
""")
_STILL_UNMARKED = text("""
SELECT message_key FROM outbox_messages WHERE message_key = ANY(CAST(:keys AS text[])) AND published_at IS NULL
""")
_BACKLOG = text("""
SELECT count(*), min(created_at), now() FROM outbox_messages WHERE published_at IS NULL AND stream = :stream
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
    engine: Engine, publisher: StreamPublisher, ids: list[int] | None = None, batch_size: int = 2000, *,
    should_stop: StopCheck = never, counts: PublishCounts | None = None,
) -> PublishCounts:
    """Publish the unpublished messages of `publisher.stream` (only those of `ids` when given), in id order,
    adding each committed batch to `counts` (returned). Messages another publisher holds at the moment are left
    to it. Raises `Cancelled` before a batch once `should_stop()`."""
    counts = PublishCounts() if counts is None else counts
    pending = sorted(ids) if ids is not None else None
    while pending is None or pending:
        raise_if_stopped(should_stop, "the next batch of messages")
        if pending is None:
            claim, parameters = _CLAIM_ANY, {"stream": publisher.stream, "limit": batch_size}
        else:
            batch, pending = pending[:batch_size], pending[batch_size:]
            claim, parameters = _CLAIM_IDS, {"stream": publisher.stream, "limit": batch_size, "ids": batch}
        with engine.begin() as conn:
            claimed, claimed_ids, keys, messages = conn.execute(claim, parameters).one()
            if claimed:
                result = publisher.publish(EncodedMessages(_FIELDS, messages, claimed))
                conn.execute(_MARK, {"ids": claimed_ids, "entry_ids": result.entry_ids})
        if claimed:
            added = result.added_now
            counts.add(PublishCounts(added, claimed - added))
            publisher.forget(keys)  # marked: never claimed again (the sweep covers a crash here)
        if pending is None and claimed < batch_size:
            return counts
    return counts


def sweep_guards(engine: Engine, publisher: StreamPublisher) -> int:
    """Drop the guards of messages whose outbox row is marked published (or gone): those a publisher left when
    it died between its commit and `forget`. Guards of unmarked rows stay. Returns how many were dropped."""
    dropped = 0
    for keys in publisher.guarded_keys():
        with engine.connect() as conn:
            unmarked = {key for (key,) in conn.execute(_STILL_UNMARKED, {"keys": keys})}
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
