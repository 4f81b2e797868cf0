-- How an instance's own VM runs (the communication NIC, a kernel booted
-- directly), and what its guest agent last reported (its state, versions and
-- host keys; never a secret: the agent sends none).
ALTER TABLE instances ADD COLUMN run_params TEXT NOT NULL DEFAULT '{}';
ALTER TABLE instances ADD COLUMN agent TEXT;
