-- An instance's tags (a JSON object of key to value), whether its guest
-- reads them as metadata, and its maintenance events (a JSON array, in
-- scheduling order; bounded by the registry): part of the instance row, so
-- that every change to them is an instance update with its version.
ALTER TABLE instances ADD COLUMN tags TEXT NOT NULL DEFAULT '{}';
ALTER TABLE instances ADD COLUMN metadata_tags INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN maintenance TEXT NOT NULL DEFAULT '[]';
