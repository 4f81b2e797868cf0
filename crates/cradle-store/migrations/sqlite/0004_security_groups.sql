-- Security groups (seed 004): the guest's interface on the host and its IPv6
-- address for enforcement, groups, their rules, which instances are in which
-- group, and each tenant's default rules. A rule's match is stored as the
-- JSON of cradle_secgroups::RuleSpec, so a new kind of match needs no schema
-- change.
ALTER TABLE instances ADD COLUMN local_ipv6 TEXT;
ALTER TABLE instances ADD COLUMN interface TEXT;

CREATE TABLE security_groups (
    id          TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    name        TEXT NOT NULL,
    description TEXT NOT NULL,
    instance_id TEXT REFERENCES instances(id) ON DELETE CASCADE,
    created_at  TEXT NOT NULL,
    UNIQUE (tenant, name)
) STRICT;

CREATE TABLE security_group_rules (
    id         TEXT PRIMARY KEY,
    group_id   TEXT NOT NULL REFERENCES security_groups(id) ON DELETE CASCADE,
    spec       TEXT NOT NULL,
    created_at TEXT NOT NULL
) STRICT;

CREATE INDEX security_group_rules_by_group ON security_group_rules (group_id);

CREATE TABLE security_group_members (
    group_id    TEXT NOT NULL REFERENCES security_groups(id) ON DELETE CASCADE,
    instance_id TEXT NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
    PRIMARY KEY (group_id, instance_id)
) STRICT;

CREATE TABLE tenant_default_rules (
    id         TEXT PRIMARY KEY,
    tenant     TEXT NOT NULL,
    spec       TEXT NOT NULL,
    created_at TEXT NOT NULL
) STRICT;
