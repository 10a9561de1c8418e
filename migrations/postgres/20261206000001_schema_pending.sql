-- Tables a pull created whose indexes and foreign keys are still to be made (after their rows,
-- and after every table of the pull). A pull interrupted before then makes them when it is run
-- again and completes.
CREATE TABLE dbsync_schema_pending (
    connection_id UUID NOT NULL REFERENCES dbsync_connections (id) ON DELETE CASCADE,
    table_name    TEXT NOT NULL,
    PRIMARY KEY (connection_id, table_name)
);
