-- The personalization package: its URL and an optional SHA-256 pin.
-- Download credentials are secret parameters and are never stored.
ALTER TABLE instances ADD COLUMN personalization_url TEXT;
ALTER TABLE instances ADD COLUMN personalization_sha256 TEXT;
