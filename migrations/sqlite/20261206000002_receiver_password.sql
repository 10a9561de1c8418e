-- A receiver may keep the sender's download password, encrypted like its token, so scheduled
-- pulls of a connection with a password can run.
ALTER TABLE dbsync_connections ADD COLUMN download_password_ciphertext BLOB;
