-- The creator's roles (fixed at creation), why an instance is in error,
-- and a per-instance event log.
ALTER TABLE instances ADD COLUMN boot_roles TEXT NOT NULL DEFAULT '[]';
ALTER TABLE instances ADD COLUMN state_reason TEXT;

CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id TEXT NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
    created_at  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    message     TEXT NOT NULL
) STRICT;

CREATE INDEX events_by_instance ON events (instance_id, id);
