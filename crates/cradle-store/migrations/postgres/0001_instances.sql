-- Instances and the host-guest message channel (as sqlite/0001).
-- Secret OS parameters have no column: they are never written anywhere.
CREATE TABLE instances (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL UNIQUE,
    project_id        TEXT NOT NULL,
    hostname          TEXT NOT NULL,
    availability_zone TEXT NOT NULL,
    launch_index      BIGINT NOT NULL,
    instance_type     TEXT NOT NULL,
    user_data         BYTEA,
    metadata          TEXT NOT NULL,
    public_keys       TEXT NOT NULL,
    metadata_address  TEXT NOT NULL UNIQUE,
    mac               TEXT NOT NULL,
    local_ipv4        TEXT,
    gateway_ipv4      TEXT,
    dns_nameservers   TEXT NOT NULL,
    public_ipv4       TEXT,
    os_type           TEXT,
    os_image          TEXT,
    os_params_public  TEXT NOT NULL,
    os_params_private TEXT NOT NULL,
    imds_tokens       TEXT NOT NULL,
    state             TEXT NOT NULL,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL,
    random_seed       BYTEA NOT NULL,
    password          TEXT
);

CREATE TABLE messages (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id TEXT NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
    direction   TEXT NOT NULL CHECK (direction IN ('to_guest', 'to_host')),
    body        BYTEA NOT NULL,
    created_at  TEXT NOT NULL
);

CREATE INDEX messages_queue ON messages (instance_id, direction, id);
