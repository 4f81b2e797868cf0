-- A cluster of hosts on one store: where each instance is served, the
-- version of every change (so that hosts can ask for what is newer than what
-- they have), what was removed, the security-group changes as a log other
-- hosts replay, and the hosts themselves.
ALTER TABLE instances ADD COLUMN host TEXT NOT NULL DEFAULT '';
ALTER TABLE instances ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
CREATE INDEX instances_by_version ON instances (version);
-- The names (never the values) of the secret parameters its host holds in
-- memory: what a host that restarts knows it has lost, to say so.
ALTER TABLE instances ADD COLUMN secret_names TEXT NOT NULL DEFAULT '[]';

-- 'change' counts every change; updating its row serializes writers, so
-- versions are committed in the order they are taken.
CREATE TABLE versions (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) STRICT;
INSERT INTO versions (name, value) VALUES ('change', 0);

CREATE TABLE removed_instances (
    id      TEXT PRIMARY KEY,
    version INTEGER NOT NULL
) STRICT;
CREATE INDEX removed_instances_by_version ON removed_instances (version);

-- Security-group ops as JSON, in the order they were made.
CREATE TABLE secgroup_log (
    version INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    op      TEXT NOT NULL,
    PRIMARY KEY (version, seq)
) STRICT;

-- Rules and default rules keep the order they were made in: new ones take
-- the change version; existing ones keep their old order, below every new one.
ALTER TABLE security_group_rules ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
UPDATE security_group_rules
   SET seq = rowid - (SELECT max(rowid) + 1 FROM security_group_rules);
ALTER TABLE tenant_default_rules ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
UPDATE tenant_default_rules
   SET seq = rowid - (SELECT max(rowid) + 1 FROM tenant_default_rules);

CREATE TABLE hosts (
    name             TEXT PRIMARY KEY,
    admin_url        TEXT NOT NULL,
    -- Where other hosts hand it secrets (mutual TLS); empty: nowhere.
    peer_url         TEXT NOT NULL,
    metadata_address TEXT NOT NULL,
    started_at       TEXT NOT NULL,
    seen_at          TEXT NOT NULL
) STRICT;
