-- Persons: distinct ids resolve to a person; identify and alias merge
-- persons by moving distinct ids, so a read of an old event finds the
-- person as of now.

CREATE TABLE persons (
    project_id  TEXT NOT NULL,
    id          TEXT NOT NULL,
    properties  TEXT NOT NULL DEFAULT '{}',
    created_at  TEXT NOT NULL,
    PRIMARY KEY (project_id, id)
);

CREATE TABLE person_distinct_ids (
    project_id  TEXT NOT NULL,
    distinct_id TEXT NOT NULL,
    person_id   TEXT NOT NULL,
    PRIMARY KEY (project_id, distinct_id)
);
CREATE INDEX person_distinct_ids_by_person ON person_distinct_ids (project_id, person_id);

-- The person an event resolved to when it was stored.
ALTER TABLE events ADD COLUMN person_id TEXT;
