"""The transactional outbox of the product files: messages written with the chunk that staged them, published
to the Redis stream after the commit, then marked published.

Publishing is exactly once: a batch of messages is claimed (`FOR UPDATE SKIP LOCKED`, so two publishers never
take the same row at once), added through `StreamPublisher` (which adds a message key only once), and marked
in the same transaction as the claim. A crash anywhere leaves the rows unpublished or the stream already
holding them; the next publish (the same run's final sweep, or the next run's) completes them without a
second entry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import Engine, text

from operations.infra.redis_stream import StreamMessage, StreamPublisher

_CLAIM = """
SELECT id, message_key, message_type, payload::text FROM outbox_messages
WHERE published_at IS NULL AND stream = :stream {only}
ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED
"""
_CLAIM_ANY = text(_CLAIM.format(only=""))
_CLAIM_IDS = text(_CLAIM.format(only="AND id = ANY(CAST(:ids AS bigint[]))"))
_MARK = text("""
UPDATE outbox_messages SET published_at = now(), stream_entry_id = m.entry_id
FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS m(id bigint, entry_id text)
WHERE outbox_messages.id = m.id
""")


@dataclass
class PublishCounts:
    published: int = 0          # added to the stream now
    already_in_stream: int = 0  # added by an earlier attempt that crashed before marking them

    def add(self, other: PublishCounts) -> None:
        self.published += other.published
        self.already_in_stream += other.already_in_stream


def publish_outbox(
    engine: Engine, publisher: StreamPublisher, ids: list[int] | None = None, batch_size: int = 2000
) -> PublishCounts:
    """Publish the unpublished messages of `publisher.stream` (only those of `ids` when given), in id order.
    Messages another publisher holds at the moment are left to it."""
    counts = PublishCounts()
    pending = sorted(ids) if ids is not None else None
    while pending is None or pending:
        if pending is None:
            claim, parameters = _CLAIM_ANY, {"stream": publisher.stream, "limit": batch_size}
        else:
            batch, pending = pending[:batch_size], pending[batch_size:]
            claim, parameters = _CLAIM_IDS, {"stream": publisher.stream, "limit": batch_size, "ids": batch}
        with engine.begin() as conn:
            rows = conn.execute(claim, parameters).all()
            if rows:
                results = publisher.publish([
                    StreamMessage(key, {"message_key": key, "type": message_type, "outbox_id": str(id_),
                                        "payload": payload})
                    for id_, key, message_type, payload in rows
                ])
                marks = [{"id": row[0], "entry_id": r.entry_id} for row, r in zip(rows, results)]
                conn.execute(_MARK, {"rows": json.dumps(marks)})
        if rows:
            added = sum(r.added for r in results)
            counts.add(PublishCounts(added, len(results) - added))
        if pending is None and len(rows) < batch_size:
            return counts
    return counts
