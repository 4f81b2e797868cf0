-- The creator's roles, why an instance is in error, and its event log (as sqlite/0003).
ALTER TABLE instances ADD COLUMN boot_roles TEXT NOT NULL DEFAULT '[]';
ALTER TABLE instances ADD COLUMN state_reason TEXT;

CREATE TABLE events (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id TEXT NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
    created_at  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    message     TEXT NOT NULL
);

CREATE INDEX events_by_instance ON events (instance_id, id);
