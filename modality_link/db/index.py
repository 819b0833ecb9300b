"""The archive index: patients, studies, series and instances (the keys of PS3.4 C.6)."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from modality_link.db.connection import Connection


@dataclass
class InstanceRecord:
    """The index row of one archived instance, with its patient, study and series keys: what
    :meth:`Index.add` writes."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax: str
    path: str
    size: int
    patient_id: str = ""
    patient_name: str = ""
    birth_date: str = ""
    sex: str = ""
    study_date: str = ""
    study_time: str = ""
    accession: str = ""
    study_id: str = ""
    study_description: str = ""
    referring_physician: str = ""
    charset: str = ""
    modality: str = ""
    series_number: str = ""
    series_description: str = ""
    body_part: str = ""
    instance_number: str = ""
    source_ae: str = ""
    received_at: float = field(default_factory=time.time)
    #: Optional keys of the series and of the image that Query/Retrieve answers (keyword ->
    #: value as text, multiple values joined by a backslash; only those the instance has).
    series_keys: dict[str, str] = field(default_factory=dict)
    image_keys: dict[str, str] = field(default_factory=dict)
    #: The Request Attributes Sequence (0040,0275): (Requested Procedure ID, Scheduled
    #: Procedure Step ID) of each item.
    requests: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class InstanceRow:
    """One archived instance as the index holds it; `path` is relative to the archive folder."""

    sop_instance_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str
    instance_number: str
    transfer_syntax: str
    size: int
    path: str
    source_ae: str
    received_at: float


@dataclass(frozen=True)
class StudyRow:
    """One study with its patient and counts (IPC ``studies.list``)."""

    study_uid: str
    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    study_date: str
    study_time: str
    accession: str
    study_id: str
    description: str
    series: int
    instances: int
    modalities: str

    def to_dict(self) -> dict[str, Any]:
        """The study as ``studies.list`` and ``status`` show it (docs/ipc.md)."""
        return asdict(self)


@dataclass(frozen=True)
class StudyUse:
    """When a study was last used - stored (its newest instance), sent, retrieved or burned -
    and whether the operator protected it from the disk clean-up (docs/design.md "Disk
    clean-up")."""

    study_uid: str
    last_used: float
    protected: bool


@dataclass(frozen=True)
class InstanceStudy:
    """An archived instance with its study and patient: what the audit trail names of an
    instance sent, retrieved or exported (PS3.15 A.5.3)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    accession: str
    patient_id: str
    patient_name: str


_INSTANCE = """SELECT i.sop_instance_uid, i.series_uid, se.study_uid, i.sop_class_uid, i.instance_number,
                      i.transfer_syntax, i.size, i.path, i.source_ae, i.received_at
               FROM instances i JOIN series se USING(series_uid)"""


class Index:
    """The archive's index rows."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def add(self, rec: InstanceRecord, flush: bool = True) -> str | None:
        """Insert or replace the row of `rec`; return the previous relative path, if any.

        Re-storing an existing SOP Instance UID replaces its row (never a second row); a study or
        series that no longer has any instance afterwards is removed. ``flush=False`` commits
        with synchronous=NORMAL (survives a process crash, not a power cut): for rows that
        `Archive.reconcile` rebuilds from their files.
        """
        r = vars(rec) | {  # (asdict would copy the dicts of keys deeply, for nothing)
            "series_attributes": json.dumps({"keys": rec.series_keys, "requests": rec.requests}),
            "image_attributes": json.dumps(rec.image_keys),
        }
        key = rec.patient_id or f"name:{rec.patient_name}"
        with self._conn.transaction(durable=flush) as c:
            old = c.execute(
                "SELECT path, series_uid FROM instances WHERE sop_instance_uid=?", (rec.sop_instance_uid,)
            ).fetchone()
            c.execute(
                """INSERT INTO patients(patient_key, patient_id, patient_name, birth_date, sex, name_folded)
                   VALUES (?,?,?,?,?,?)
                   ON CONFLICT(patient_key) DO UPDATE SET patient_name=excluded.patient_name,
                     birth_date=excluded.birth_date, sex=excluded.sex, name_folded=excluded.name_folded""",
                (key, rec.patient_id, rec.patient_name, rec.birth_date, rec.sex, rec.patient_name.casefold()),
            )
            pk = c.execute("SELECT pk FROM patients WHERE patient_key=?", (key,)).fetchone()[0]
            c.execute(
                """INSERT INTO studies(study_uid, patient_pk, study_date, study_time, accession,
                     study_id, description, referring_physician, charset)
                   VALUES (:study_uid, :pk, :study_date, :study_time, :accession, :study_id,
                     :study_description, :referring_physician, :charset)
                   ON CONFLICT(study_uid) DO UPDATE SET patient_pk=excluded.patient_pk""",
                r | {"pk": pk},
            )
            c.execute(
                """INSERT INTO series(series_uid, study_uid, modality, series_number,
                     description, body_part, attributes)
                   VALUES (:series_uid, :study_uid, :modality, :series_number,
                     :series_description, :body_part, :series_attributes)
                   ON CONFLICT(series_uid) DO UPDATE SET study_uid=excluded.study_uid,
                     attributes=COALESCE(series.attributes, excluded.attributes)""",
                r,
            )
            c.execute(
                """INSERT OR REPLACE INTO instances(sop_instance_uid, series_uid, sop_class_uid,
                     instance_number, transfer_syntax, size, path, source_ae, received_at, attributes)
                   VALUES (:sop_instance_uid, :series_uid, :sop_class_uid, :instance_number,
                     :transfer_syntax, :size, :path, :source_ae, :received_at, :image_attributes)""",
                r,
            )
            if old is not None and old["series_uid"] != rec.series_uid:
                _drop_empty(c, old["series_uid"])
        return old["path"] if old is not None else None

    def instance(self, sop_instance_uid: str) -> InstanceRow | None:
        row = self._conn.one(f"{_INSTANCE} WHERE i.sop_instance_uid=?", (sop_instance_uid,))
        return InstanceRow(**row) if row is not None else None

    def paths(self) -> set[str]:
        """Every indexed relative path (for reconciling the archive with the index)."""
        return {r[0] for r in self._conn.query("SELECT path FROM instances")}

    def paths_without_keys(self) -> list[str]:
        """Relative paths of the instances indexed before the Query/Retrieve keys were (schema
        version 7): :meth:`Archive.reconcile` reads them again."""
        rows = self._conn.query(
            """SELECT i.path FROM instances i JOIN series se USING(series_uid)
               WHERE i.attributes IS NULL OR se.attributes IS NULL""")
        return [r[0] for r in rows]

    def qr_entities(self, level: str, scope: dict[str, list[str]], counts: bool = True,
                    contains: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
        """The entities of a Query/Retrieve level (PATIENT, STUDY, SERIES or IMAGE; PS3.4 C.6)
        with their keys and those of the levels above, by DICOM keyword; the optional keys of the
        series and the image as :meth:`add` stored them ("RequestAttributesSequence" a list of
        (Requested Procedure ID, Scheduled Procedure Step ID)); the computed keys (Number of
        ... Related ..., Modalities in Study; left out with `counts` false). `scope` restricts
        unique keys (PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID) to the
        values listed; `contains` ({keyword: text}) keeps only entities whose value of that key
        has the text in it (Patient's Name case-folded), where the key is a column: a cheap
        preselection for the caller's matching. The rows are read at once, converted as they
        are taken."""
        counted, plain, group, order = _QR_LEVELS[level]
        select = counted if counts else plain
        if not counts and level != "PATIENT":
            group = ""  # one row per entity already
        where, args = _scope(scope, contains or {})
        rows = self._conn.query(f"{select} {where} {group} {order}", args)
        for row in rows:
            keys = dict(row)
            series = keys.pop("series_attributes", None)
            if series is not None:
                parsed = json.loads(series or "{}")
                keys.update(parsed.get("keys", {}))
                keys["RequestAttributesSequence"] = [tuple(r) for r in parsed.get("requests", [])]
            image = keys.pop("image_attributes", None)
            if image is not None:
                keys.update(json.loads(image or "{}"))
            if "ModalitiesInStudy" in keys:
                keys["ModalitiesInStudy"] = "\\".join(sorted(filter(None, (keys["ModalitiesInStudy"] or "").split(","))))
            yield keys

    def qr_instances(self, scope: dict[str, list[str]]) -> list[InstanceRow]:
        """The instances below the entities that `scope` (as for :meth:`qr_entities`) selects,
        by study, series number and instance number: what a C-MOVE or C-GET sends."""
        where, args = _scope(scope, {})
        rows = self._conn.query(
            f"""{_INSTANCE} JOIN studies s ON s.study_uid=se.study_uid JOIN patients p ON p.pk=s.patient_pk
                {where} ORDER BY s.study_date, s.study_uid, CAST(se.series_number AS INTEGER), se.series_uid,
                CAST(i.instance_number AS INTEGER), i.sop_instance_uid""", args)
        return [InstanceRow(**r) for r in rows]

    def instance_studies(self, sop_instance_uids: list[str]) -> dict[str, InstanceStudy]:
        """The study and patient of each of these instances that is indexed, by SOP Instance UID."""
        found: dict[str, InstanceStudy] = {}
        for i in range(0, len(sop_instance_uids), 500):
            chunk = sop_instance_uids[i : i + 500]
            rows = self._conn.query(
                f"""SELECT i.sop_instance_uid, i.sop_class_uid, s.study_uid, s.accession, p.patient_id,
                           p.patient_name
                    FROM instances i JOIN series se USING(series_uid) JOIN studies s ON s.study_uid=se.study_uid
                    JOIN patients p ON p.pk=s.patient_pk
                    WHERE i.sop_instance_uid IN ({",".join("?" * len(chunk))})""", chunk)
            found |= {r["sop_instance_uid"]: InstanceStudy(**r) for r in rows}
        return found

    def studies(self) -> list[StudyRow]:
        """Every study with its patient and counts, oldest first (the CLI's `studies`)."""
        rows = self._conn.query(
            """SELECT s.study_uid, p.patient_id, p.patient_name, p.birth_date, p.sex,
                      s.study_date, s.study_time, s.accession, s.study_id, s.description,
                      (SELECT COUNT(*) FROM series se WHERE se.study_uid=s.study_uid) AS series,
                      (SELECT COUNT(*) FROM instances i JOIN series se USING(series_uid)
                         WHERE se.study_uid=s.study_uid) AS instances,
                      (SELECT GROUP_CONCAT(DISTINCT se.modality) FROM series se
                         WHERE se.study_uid=s.study_uid) AS modalities
               FROM studies s JOIN patients p ON p.pk=s.patient_pk
               ORDER BY s.study_date, s.study_time, s.study_uid"""
        )
        return [StudyRow(**r) for r in rows]

    def series_instance_uids(self, series_uid: str) -> list[str]:
        """The SOP Instance UIDs of a series in Instance Number order."""
        rows = self._conn.query(
            "SELECT sop_instance_uid FROM instances WHERE series_uid=? ORDER BY CAST(instance_number AS INTEGER)",
            (series_uid,),
        )
        return [r[0] for r in rows]

    def study_instances(self, study_uid: str) -> list[InstanceRow]:
        """The instances of a study by Series Number, then Instance Number."""
        rows = self._conn.query(
            f"{_INSTANCE} WHERE se.study_uid=? ORDER BY se.series_number, CAST(i.instance_number AS INTEGER)",
            (study_uid,),
        )
        return [InstanceRow(**r) for r in rows]

    # -- use and protection of studies (docs/design.md "Disk clean-up") ---------------------------

    def touch(self, study_uids: list[str]) -> None:
        """The studies were used now (sent, retrieved by a peer, burned): the clean-up deletes
        the least recently used first. Storing needs no call: an instance's received_at counts."""
        now = time.time()
        with self._conn.transaction(durable=False) as c:  # losing a touch only makes a study older
            c.executemany(
                """INSERT INTO study_usage(study_uid, used_at) VALUES (?,?)
                   ON CONFLICT(study_uid) DO UPDATE SET used_at=excluded.used_at""",
                [(uid, now) for uid in dict.fromkeys(study_uids)],
            )

    def touch_instances(self, sop_instance_uids: list[str]) -> None:
        """:meth:`touch` the studies these instances belong to."""
        studies: set[str] = set()
        for i in range(0, len(sop_instance_uids), 500):
            chunk = sop_instance_uids[i : i + 500]
            studies |= {r[0] for r in self._conn.query(
                f"""SELECT DISTINCT se.study_uid FROM instances i JOIN series se USING(series_uid)
                    WHERE i.sop_instance_uid IN ({",".join("?" * len(chunk))})""", chunk)}
        self.touch(sorted(studies))

    def protect(self, study_uid: str, protected: bool) -> bool:
        """Protect a study from the clean-up (or no longer); False when no such study is indexed."""
        with self._conn.transaction() as c:
            if c.execute("SELECT 1 FROM studies WHERE study_uid=?", (study_uid,)).fetchone() is None:
                return False
            c.execute(
                """INSERT INTO study_usage(study_uid, protected) VALUES (?,?)
                   ON CONFLICT(study_uid) DO UPDATE SET protected=excluded.protected""",
                (study_uid, int(protected)),
            )
        return True

    def usage(self) -> dict[str, StudyUse]:
        """Every study's last use and protection, by Study Instance UID."""
        rows = self._conn.query(
            """SELECT se.study_uid, MAX(i.received_at) AS stored_at, u.used_at, COALESCE(u.protected, 0) AS protected
               FROM series se JOIN instances i USING(series_uid)
               LEFT JOIN study_usage u ON u.study_uid=se.study_uid GROUP BY se.study_uid"""
        )
        return {r["study_uid"]: StudyUse(r["study_uid"], max(r["stored_at"], r["used_at"] or 0.0), bool(r["protected"]))
                for r in rows}


_PATIENT_KEYS = """p.patient_id AS PatientID, p.patient_name AS PatientName, p.birth_date AS PatientBirthDate,
    p.sex AS PatientSex"""
_STUDY_KEYS = f"""{_PATIENT_KEYS}, s.study_uid AS StudyInstanceUID, s.study_date AS StudyDate,
    s.study_time AS StudyTime, s.accession AS AccessionNumber, s.study_id AS StudyID,
    s.description AS StudyDescription, s.referring_physician AS ReferringPhysicianName"""
_SERIES_KEYS = f"""{_STUDY_KEYS}, se.series_uid AS SeriesInstanceUID, se.modality AS Modality,
    se.series_number AS SeriesNumber, se.description AS SeriesDescription, se.body_part AS BodyPartExamined,
    COALESCE(se.attributes, '') AS series_attributes"""
_IMAGE_KEYS = f"""{_SERIES_KEYS}, i.sop_instance_uid AS SOPInstanceUID, i.sop_class_uid AS SOPClassUID,
    i.instance_number AS InstanceNumber, COALESCE(i.attributes, '') AS image_attributes"""
_STUDIES = "FROM studies s JOIN patients p ON p.pk=s.patient_pk"
#: Per level: the SELECTs of :meth:`Index.qr_entities` with and without the computed keys (the
#: WHERE follows), the GROUP BY of the first and the ORDER BY.
_QR_LEVELS = {
    "PATIENT": (
        f"""SELECT {_PATIENT_KEYS}, COUNT(DISTINCT s.study_uid) AS NumberOfPatientRelatedStudies,
              COUNT(DISTINCT se.series_uid) AS NumberOfPatientRelatedSeries,
              COUNT(i.sop_instance_uid) AS NumberOfPatientRelatedInstances
            {_STUDIES} JOIN series se ON se.study_uid=s.study_uid
            JOIN instances i ON i.series_uid=se.series_uid""",
        f"SELECT {_PATIENT_KEYS} {_STUDIES}",
        "GROUP BY p.pk", "ORDER BY p.patient_name, p.patient_id",
    ),
    "STUDY": (
        f"""SELECT {_STUDY_KEYS}, COUNT(DISTINCT se.series_uid) AS NumberOfStudyRelatedSeries,
              COUNT(i.sop_instance_uid) AS NumberOfStudyRelatedInstances,
              GROUP_CONCAT(DISTINCT se.modality) AS ModalitiesInStudy
            {_STUDIES} LEFT JOIN series se ON se.study_uid=s.study_uid
            LEFT JOIN instances i ON i.series_uid=se.series_uid""",
        f"SELECT {_STUDY_KEYS} {_STUDIES}",
        "GROUP BY s.study_uid", "ORDER BY s.study_date, s.study_time, s.study_uid",
    ),
    "SERIES": (
        f"""SELECT {_SERIES_KEYS}, COUNT(i.sop_instance_uid) AS NumberOfSeriesRelatedInstances
            {_STUDIES} JOIN series se ON se.study_uid=s.study_uid
            LEFT JOIN instances i ON i.series_uid=se.series_uid""",
        f"SELECT {_SERIES_KEYS} {_STUDIES} JOIN series se ON se.study_uid=s.study_uid",
        "GROUP BY se.series_uid", "ORDER BY s.study_uid, CAST(se.series_number AS INTEGER), se.series_uid",
    ),
    "IMAGE": (
        f"""SELECT {_IMAGE_KEYS} {_STUDIES} JOIN series se ON se.study_uid=s.study_uid
            JOIN instances i ON i.series_uid=se.series_uid""",
        f"""SELECT {_IMAGE_KEYS} {_STUDIES} JOIN series se ON se.study_uid=s.study_uid
            JOIN instances i ON i.series_uid=se.series_uid""",
        "", "ORDER BY se.series_uid, CAST(i.instance_number AS INTEGER), i.sop_instance_uid",
    ),
}
#: The unique key of each level (PS3.4 C.6.1.1, C.6.2.1) and its column.
_UNIQUE_COLUMNS = {"PatientID": "p.patient_id", "StudyInstanceUID": "s.study_uid",
                   "SeriesInstanceUID": "se.series_uid", "SOPInstanceUID": "i.sop_instance_uid"}


#: The columns :meth:`Index.qr_entities` preselects on (`contains`); Patient's Name by its
#: case-folded copy (NULL in rows from before it, which are kept).
_CONTAINS_COLUMNS = {
    "PatientName": "COALESCE(instr(p.name_folded, ?), 1)", "PatientID": "instr(p.patient_id, ?)",
    "AccessionNumber": "instr(s.accession, ?)", "StudyID": "instr(s.study_id, ?)",
    "StudyDescription": "instr(s.description, ?)", "Modality": "instr(se.modality, ?)",
    "SeriesDescription": "instr(se.description, ?)", "BodyPartExamined": "instr(se.body_part, ?)",
}


def _scope(scope: dict[str, list[str]], contains: dict[str, str]) -> tuple[str, list[str]]:
    """The WHERE clause that restricts unique keys to the values listed and the columns of
    `contains` to values with that text in them."""
    terms, args = [], []
    for keyword, values in scope.items():
        terms.append(f"{_UNIQUE_COLUMNS[keyword]} IN ({','.join('?' * len(values))})")
        args += values
    for keyword, text in contains.items():
        if keyword in _CONTAINS_COLUMNS:
            terms.append(f"{_CONTAINS_COLUMNS[keyword]} > 0")
            args.append(text)
    return ("WHERE " + " AND ".join(terms)) if terms else "", args


def _drop_empty(c: sqlite3.Connection, series_uid: str) -> None:
    """Inside a transaction: remove a series left without instances, and its study if empty."""
    row = c.execute("SELECT study_uid FROM series WHERE series_uid=?", (series_uid,)).fetchone()
    if row is None:
        return
    c.execute(
        "DELETE FROM series WHERE series_uid=? AND NOT EXISTS (SELECT 1 FROM instances WHERE series_uid=?)",
        (series_uid, series_uid),
    )
    c.execute(
        "DELETE FROM studies WHERE study_uid=? AND NOT EXISTS (SELECT 1 FROM series WHERE study_uid=?)",
        (row["study_uid"], row["study_uid"]),
    )
