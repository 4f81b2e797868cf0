-- An instance's disks (JSON list of {path, format}), memory and vcpus:
-- what the hypervisor driver and the install appliance start it with.
ALTER TABLE instances ADD COLUMN disks TEXT NOT NULL DEFAULT '[]';
ALTER TABLE instances ADD COLUMN memory_mib INTEGER NOT NULL DEFAULT 512;
ALTER TABLE instances ADD COLUMN vcpus INTEGER NOT NULL DEFAULT 1;
