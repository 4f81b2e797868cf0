-- What a self_install boots with (CD-ROM, kernel, initrd, command line,
-- boot device), as JSON: stored apart from the run setup so that a
-- reinstall repeats it.
ALTER TABLE instances ADD COLUMN install_params TEXT NOT NULL DEFAULT '{}';
