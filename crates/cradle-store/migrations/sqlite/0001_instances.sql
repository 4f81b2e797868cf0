-- Instances and the host-guest message channel.
-- Secret OS parameters have no column: they are never written anywhere.
CREATE TABLE instances (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL UNIQUE,
    project_id        TEXT NOT NULL,
    hostname          TEXT NOT NULL,
    availability_zone TEXT NOT NULL,
    launch_index      INTEGER NOT NULL,
    instance_type     TEXT NOT NULL,
    user_data         BLOB,
    metadata          TEXT NOT NULL,  -- JSON object
    public_keys       TEXT NOT NULL,  -- JSON object
    metadata_address  TEXT NOT NULL UNIQUE,
    mac               TEXT NOT NULL,
    local_ipv4        TEXT,
    gateway_ipv4      TEXT,
    dns_nameservers   TEXT NOT NULL,  -- JSON array
    public_ipv4       TEXT,
    os_type           TEXT,
    os_image          TEXT,
    os_params_public  TEXT NOT NULL,  -- JSON object
    os_params_private TEXT NOT NULL,  -- JSON object; never logged, never shown
    imds_tokens       TEXT NOT NULL,
    state             TEXT NOT NULL,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL,
    random_seed       BLOB NOT NULL,
    password          TEXT
) STRICT;

CREATE TABLE messages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id TEXT NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
    direction   TEXT NOT NULL CHECK (direction IN ('to_guest', 'to_host')),
    body        BLOB NOT NULL,
    created_at  TEXT NOT NULL
) STRICT;

CREATE INDEX messages_queue ON messages (instance_id, direction, id);
