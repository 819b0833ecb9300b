"""The schema of the service's SQLite file and its migrations: the only code that knows it.

The file holds the archive index at patient / study / series / instance level (the keys
Query/Retrieve needs, PS3.4 C.6), the job queue with the per-node sent/committed state and the
Storage Commitment transactions (PS3.4 J.3), worklist items, exams and their MPPS messages
(PS3.4 Annex F), the operator's alerts, and the archive's life cycle: when each study was last
used, whether it is protected, the deletions under way (docs/design.md "Disk clean-up").

``MIGRATIONS[n]`` takes a file from version n to n + 1 (``PRAGMA user_version``); a new file runs
them all. A migration never changes after it shipped: a change is a new one at the end.

Job kinds share the ``jobs``/``job_items`` tables: ``send`` and ``commit`` (node = a configured
node, items = SOP Instance UIDs), ``burn`` (node = ``drive:DEV`` or ``iso:PATH``, items = the
SOP Instance UIDs to write, params = the burn's options and its discs). The MPPS messages are
jobs of kind ``mpps`` in tables of their own with the same columns, ``mpps_jobs``/
``mpps_job_items`` (node = the MPPS node, no items, params = the exam, the message, create or
set, and its data set in the DICOM JSON model).
"""

from __future__ import annotations

from modality_link.db.connection import Connection

MIGRATIONS = [
    # version 1
    """
    CREATE TABLE patients (
        pk INTEGER PRIMARY KEY,
        patient_key TEXT NOT NULL UNIQUE,       -- Patient ID, or the name when the ID is empty
        patient_id TEXT NOT NULL,
        patient_name TEXT NOT NULL,
        birth_date TEXT NOT NULL,
        sex TEXT NOT NULL
    );
    CREATE INDEX patients_name ON patients(patient_name);
    CREATE TABLE studies (
        study_uid TEXT PRIMARY KEY,
        patient_pk INTEGER NOT NULL REFERENCES patients(pk),
        study_date TEXT NOT NULL,
        study_time TEXT NOT NULL,
        accession TEXT NOT NULL,
        study_id TEXT NOT NULL,
        description TEXT NOT NULL,
        referring_physician TEXT NOT NULL,
        charset TEXT NOT NULL
    );
    CREATE INDEX studies_patient ON studies(patient_pk);
    CREATE INDEX studies_date ON studies(study_date);
    CREATE INDEX studies_accession ON studies(accession);
    CREATE TABLE series (
        series_uid TEXT PRIMARY KEY,
        study_uid TEXT NOT NULL REFERENCES studies(study_uid),
        modality TEXT NOT NULL,
        series_number TEXT NOT NULL,
        description TEXT NOT NULL,
        body_part TEXT NOT NULL
    );
    CREATE INDEX series_study ON series(study_uid);
    CREATE TABLE instances (
        sop_instance_uid TEXT PRIMARY KEY,
        series_uid TEXT NOT NULL REFERENCES series(series_uid),
        sop_class_uid TEXT NOT NULL,
        instance_number TEXT NOT NULL,
        transfer_syntax TEXT NOT NULL,
        size INTEGER NOT NULL,
        path TEXT NOT NULL,                     -- relative to the archive folder
        source_ae TEXT NOT NULL,
        received_at REAL NOT NULL
    );
    CREATE INDEX instances_series ON instances(series_uid);
    CREATE TABLE alerts (
        id INTEGER PRIMARY KEY,
        time REAL NOT NULL,
        level TEXT NOT NULL,                    -- warning | error
        code TEXT NOT NULL,                     -- e.g. disk-full
        message TEXT NOT NULL,
        cleared INTEGER NOT NULL DEFAULT 0
    );
    """,
    # version 2: the job queue (docs/design.md "Jobs and failures"), per-node sent/committed
    # state, Storage Commitment transactions (PS3.4 J.3)
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,                     -- send | commit (later: mpps, burn, retrieve)
        node TEXT NOT NULL,                     -- destination node name ('' if none)
        state TEXT NOT NULL,                    -- queued | running | done | failed | cancelled
        params TEXT NOT NULL DEFAULT '{}',      -- JSON, the kind's own parameters
        parent_id INTEGER REFERENCES jobs(id),  -- the job that queued this one
        attempts INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL DEFAULT 1,
        next_attempt_at REAL NOT NULL,
        last_error TEXT NOT NULL DEFAULT '',
        detail TEXT NOT NULL DEFAULT '',        -- what the job does or waits for, in words
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX jobs_state ON jobs(state, next_attempt_at);
    CREATE INDEX jobs_parent ON jobs(parent_id);
    CREATE TABLE job_items (
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        seq INTEGER NOT NULL,
        item TEXT NOT NULL,                     -- a SOP Instance UID for send and commit
        state TEXT NOT NULL DEFAULT 'pending',  -- pending | done | warning | failed
        status INTEGER,                         -- the last DICOM status
        detail TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (job_id, item)
    );
    CREATE TABLE node_instances (
        node TEXT NOT NULL,
        sop_instance_uid TEXT NOT NULL,
        sent_at REAL,
        committed_at REAL,
        PRIMARY KEY (node, sop_instance_uid)
    );
    CREATE INDEX node_instances_uid ON node_instances(sop_instance_uid);
    CREATE TABLE commit_transactions (
        transaction_uid TEXT PRIMARY KEY,
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        node TEXT NOT NULL,
        requested_at REAL NOT NULL,
        reported_at REAL
    );
    """,
    # version 3: worklist items, exams and the MPPS outbox (PS3.4 Annex F)
    """
    CREATE TABLE worklist_items (
        sps_id TEXT PRIMARY KEY,                -- Scheduled Procedure Step ID (0040,0009)
        node TEXT NOT NULL,
        item_json TEXT NOT NULL,                -- the item in the DICOM JSON model
        fetched_at REAL NOT NULL
    );
    CREATE TABLE exams (
        id INTEGER PRIMARY KEY,
        state TEXT NOT NULL,                    -- IN PROGRESS | COMPLETED | DISCONTINUED
        sps_id TEXT NOT NULL,                   -- '' for an unscheduled exam
        item_json TEXT NOT NULL,                -- worklist item or local patient data (JSON model)
        study_uid TEXT NOT NULL,
        study_id TEXT NOT NULL,
        pps_id TEXT NOT NULL,
        mpps_node TEXT NOT NULL,                -- '' when no MPPS node is configured
        mpps_uid TEXT NOT NULL,                 -- '' until known (SCP-assigned UIDs)
        started_at REAL NOT NULL,
        ended_at REAL,
        reason TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE exam_objects (
        sop_instance_uid TEXT PRIMARY KEY,
        exam_id INTEGER NOT NULL REFERENCES exams(id),
        sop_class_uid TEXT NOT NULL,
        series_uid TEXT NOT NULL,
        series_description TEXT NOT NULL,
        protocol_name TEXT NOT NULL,
        operator TEXT NOT NULL,
        performing_physician TEXT NOT NULL,
        is_image INTEGER NOT NULL,
        added_at REAL NOT NULL
    );
    CREATE INDEX exam_objects_exam ON exam_objects(exam_id);
    CREATE TABLE mpps_outbox (
        id INTEGER PRIMARY KEY,                 -- the order messages are sent in
        exam_id INTEGER NOT NULL REFERENCES exams(id),
        kind TEXT NOT NULL,                     -- create | set
        node TEXT NOT NULL,
        dataset_json TEXT NOT NULL,
        state TEXT NOT NULL,                    -- queued | sent | failed
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL NOT NULL,
        last_error TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        sent_at REAL
    );
    CREATE INDEX mpps_outbox_state ON mpps_outbox(state, id);
    """,
    # version 4: the auto-send rules "series" and "exam" (docs/design.md "Exams, MPPS and auto-send")
    """
    CREATE TABLE exam_series (
        exam_id INTEGER NOT NULL REFERENCES exams(id),
        series_uid TEXT NOT NULL,
        completed_at REAL NOT NULL,             -- declared complete, or completed by the exam end
        queued_at REAL,                         -- rule "series" applied (NULL: still to do)
        PRIMARY KEY (exam_id, series_uid)
    );
    ALTER TABLE exams ADD COLUMN auto_queued_at REAL;  -- rule "exam" applied (NULL: still to do)
    UPDATE exams SET auto_queued_at = ended_at WHERE ended_at IS NOT NULL;
    """,
    # version 5: the MPPS messages become a job queue of their own (modality_link.mpps_outbox):
    # the columns of jobs and job_items, in their own tables, so that their ids are not those of
    # the send, commit and burn jobs that jobs.list shows; a job may wait for another to end
    # (after_id: an N-SET for its N-CREATE). Every outbox row moves, with its id, its state
    # (queued, sent -> done, failed), attempts (a sent row counted its successful attempt, a job
    # does not), error and times; max_attempts 4 is the default node's retries + 1 (it bounds
    # only unforeseen errors: an SCP that cannot be reached is tried until it answers).
    """
    ALTER TABLE jobs ADD COLUMN after_id INTEGER REFERENCES jobs(id);
    CREATE TABLE mpps_jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,                     -- mpps
        node TEXT NOT NULL,                     -- the MPPS node
        state TEXT NOT NULL,                    -- queued | running | done | failed | cancelled
        params TEXT NOT NULL DEFAULT '{}',      -- JSON: exam_id, message (create | set), dataset
        parent_id INTEGER REFERENCES mpps_jobs(id),
        after_id INTEGER REFERENCES mpps_jobs(id),  -- the job that must end before this one starts
        attempts INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL DEFAULT 1,
        next_attempt_at REAL NOT NULL,
        last_error TEXT NOT NULL DEFAULT '',
        detail TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX mpps_jobs_state ON mpps_jobs(state, next_attempt_at);
    CREATE TABLE mpps_job_items (
        job_id INTEGER NOT NULL REFERENCES mpps_jobs(id),
        seq INTEGER NOT NULL,
        item TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        status INTEGER,
        detail TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (job_id, item)
    );
    ALTER TABLE exams ADD COLUMN mpps_create_job INTEGER REFERENCES mpps_jobs(id);  -- its N-CREATE
    ALTER TABLE exams ADD COLUMN mpps_set_job INTEGER REFERENCES mpps_jobs(id);     -- its N-SET
    INSERT INTO mpps_jobs(id, kind, node, state, params, attempts, max_attempts, next_attempt_at, last_error,
                          created_at, updated_at)
        SELECT id, 'mpps', node, CASE state WHEN 'sent' THEN 'done' ELSE state END,
               json_object('exam_id', exam_id, 'message', kind, 'dataset', dataset_json),
               CASE state WHEN 'sent' THEN MAX(attempts - 1, 0) ELSE attempts END, 4, next_attempt,
               last_error, created_at, COALESCE(sent_at, created_at)
        FROM mpps_outbox;
    UPDATE exams SET
        mpps_create_job = (SELECT MAX(o.id) FROM mpps_outbox o WHERE o.exam_id = exams.id AND o.kind = 'create'),
        mpps_set_job = (SELECT MAX(o.id) FROM mpps_outbox o WHERE o.exam_id = exams.id AND o.kind = 'set');
    UPDATE mpps_jobs SET after_id = (SELECT e.mpps_create_job FROM exams e WHERE e.mpps_set_job = mpps_jobs.id);
    DROP TABLE mpps_outbox;
    """,
    # version 6: the archive's life cycle (docs/design.md "Disk clean-up"). study_usage: when a
    # study was last sent, retrieved or burned (its last store is its instances' received_at)
    # and whether the operator protected it from clean-up; no foreign key, so that the row may
    # be written for a study whose index rows are still on their way. deletions: the instances
    # of a study being deleted, written in one transaction before any file goes; a start
    # (Archive.reconcile) finishes what a crash interrupted.
    """
    CREATE TABLE study_usage (
        study_uid TEXT PRIMARY KEY,
        used_at REAL,                           -- last sent, retrieved or burned (NULL: never)
        protected INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE deletions (
        sop_instance_uid TEXT PRIMARY KEY,
        study_uid TEXT NOT NULL,
        path TEXT NOT NULL                      -- relative to the archive folder
    );
    CREATE INDEX deletions_study ON deletions(study_uid);
    CREATE INDEX exams_study ON exams(study_uid, state);
    """,
    # version 7: the optional keys the Query/Retrieve SCP answers (docs/design.md "Query/Retrieve
    # SCP"): JSON, the series' {"keys": {keyword: text}, "requests": [[Requested Procedure ID,
    # Scheduled Procedure Step ID] of each Request Attributes Sequence item]} and the image's
    # {keyword: text}. NULL: indexed before this version; Archive.reconcile() reads those files
    # again. Patient's Name case-folded (Unicode), which a C-FIND preselects on. Indexes for the
    # keys queries filter on.
    """
    ALTER TABLE patients ADD COLUMN name_folded TEXT;
    ALTER TABLE series ADD COLUMN attributes TEXT;
    ALTER TABLE instances ADD COLUMN attributes TEXT;
    CREATE INDEX patients_id ON patients(patient_id);
    CREATE INDEX studies_study_id ON studies(study_id);
    """,
    # version 8: the event journal (docs/ipc.md "Events"): every IPC event with its sequence
    # number, for the replay of ``events.subscribe {since}``; AUTOINCREMENT so that a number is
    # never handed out twice, even after pruning.
    """
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        time REAL NOT NULL,                     -- Unix seconds
        type TEXT NOT NULL,                     -- e.g. job.progress
        params TEXT NOT NULL                    -- JSON: the event's fields but type and seq
    );
    CREATE INDEX events_time ON events(time);
    """,
    # version 9: each attempt of a send, commit, burn or retrieve job, for ``jobs.show``'s history
    # (docs/ipc.md): when it started and ended, how it ended (done, retry, wait, failed,
    # interrupted) and its error. Attempts before this version are not known.
    """
    CREATE TABLE job_attempts (
        job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        started_at REAL NOT NULL,
        ended_at REAL NOT NULL,
        outcome TEXT NOT NULL,
        error TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX job_attempts_job ON job_attempts(job_id, started_at);
    """,
]



def migrate(conn: Connection) -> None:
    """Bring the file up to the last version, one migration at a time."""
    version = conn.user_version()
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.run_script(script, number)
