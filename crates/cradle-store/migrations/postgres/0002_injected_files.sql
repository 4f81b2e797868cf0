-- Files injected into the guest: a JSON object of guest path to base64 contents.
ALTER TABLE instances ADD COLUMN files TEXT NOT NULL DEFAULT '{}';
