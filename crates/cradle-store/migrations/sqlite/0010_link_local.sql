-- A guest's link-local IPv6 address when it is not the one its mac gives
-- (RFC 7217 stable privacy), for the firewall's anti-spoofing.
ALTER TABLE instances ADD COLUMN link_local_ipv6 TEXT;
