-- Which database session runs a rebuild. The run holds the rebuild's advisory lock in that
-- session for as long as it runs, and the locks of a session go with it (the process ended, lost
-- its connection, or the server restarted). So a run with no finished_at and nothing
-- queued whose session no longer holds the lock has died: the next rebuild and the worker
-- mark it finished, not successful, with an error that starts with "died:", and status
-- shows it so. NULL on runs recorded before this migration (they are dead when nobody
-- holds the lock).
ALTER TABLE chronicle_rebuild_runs ADD COLUMN backend_pid integer NULL;
