"""The archive: UID validation, atomic files, replacement, crash recovery (real files, real SQLite)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from modality_link.archive import Archive, CannotUnderstand, DatasetMismatch, is_valid_uid, read_header
from modality_link.db import Database
from sim import images
from tests.support.instances import dataset_bytes


@pytest.mark.parametrize(
    ("uid", "ok"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", True),
        ("0", True),
        ("2.25.303082821956123276942924895321046201115", True),
        ("1." + "2" * 62, True),
        ("1." + "2" * 63, False),  # 65 characters
        ("", False),
        ("1..2", False),
        ("1.02", False),  # leading zero
        ("1.2.", False),
        ("../../etc/passwd", False),
        ("1.2/3", False),
        ("1.2\x00", False),
        (None, False),
    ],
)
def test_uid_rule(uid: object, ok: bool) -> None:
    assert is_valid_uid(uid) is ok


def test_store_replace_and_index(archive: Archive, tmp_path: Path) -> None:
    files = images.write_study(tmp_path / "in", modality="MR", images=4, seed=9)
    for f in files:
        archive.store_part10(f, "SCANNER")
    (study,) = archive.db.index.studies()
    assert study.instances == 4 and study.modalities == "MR"
    # Storing the same SOP Instance UID again replaces it: one row, one file.
    ds = dcmread(files[0])
    ds.InstanceNumber = 99
    ds.save_as(files[0], enforce_file_format=True)
    rec = archive.store_part10(files[0], "SCANNER")
    assert archive.db.index.studies()[0].instances == 4
    assert len(list(archive.root.glob("*/*/*.dcm"))) == 4
    assert dcmread(archive.root / rec.path).InstanceNumber == 99
    assert dataset_bytes(archive.root / rec.path) == dataset_bytes(files[0])
    row = archive.db.index.instance(rec.sop_instance_uid)
    assert row is not None and row.instance_number == "99" and row.size == (archive.root / rec.path).stat().st_size


def test_moved_instance_leaves_no_empty_series(archive: Archive, tmp_path: Path) -> None:
    (f,) = images.write_study(tmp_path / "in", images=1, seed=2)
    old = archive.store_part10(f, "")
    ds = dcmread(f)
    ds.SeriesInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.save_as(f, enforce_file_format=True)
    archive.store_part10(f, "")
    studies = archive.db.index.studies()
    assert [s.study_uid for s in studies] == ["1.2.3.4"]
    assert not (archive.root / old.path).exists()


def test_truncated_and_bad_files_are_refused(archive: Archive, tmp_path: Path) -> None:
    (f,) = images.write_study(tmp_path / "in", images=1, seed=3)
    data = f.read_bytes()
    for cut in (1, 7, 500, len(data) // 2):
        bad = tmp_path / f"cut{cut}.dcm"
        bad.write_bytes(data[:-cut])
        with pytest.raises(CannotUnderstand):
            archive.store_part10(bad, "")
    trailing = tmp_path / "trailing.dcm"
    trailing.write_bytes(data + b"\x01\x02\x03")
    with pytest.raises(CannotUnderstand):
        read_header(trailing)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"hello")
    with pytest.raises(CannotUnderstand):
        archive.store_part10(junk, "")
    ds = dcmread(f)
    del ds.SeriesInstanceUID
    nouid = tmp_path / "nouid.dcm"
    ds.save_as(nouid, enforce_file_format=True)
    with pytest.raises(DatasetMismatch, match="Series Instance UID"):
        archive.store_part10(nouid, "")
    assert archive.db.index.studies() == []
    assert list(archive.root.rglob("*.dcm")) == []
    assert list((archive.root / ".tmp").iterdir()) == []


def test_reconcile_after_a_crash(archive: Archive, tmp_path: Path) -> None:
    files = images.write_study(tmp_path / "in", images=3, seed=4)
    recs = [archive.store_part10(f, "CT1") for f in files]
    # A crash after the rename but before the index commit, and a stale temporary file.
    fresh = Database(tmp_path / "fresh.sqlite")
    archive.db = fresh
    (archive.root / ".tmp" / "dead.part").write_bytes(b"partial")
    assert archive.reconcile() == 3
    assert fresh.index.studies()[0].instances == 3
    assert fresh.index.instance(recs[0].sop_instance_uid).source_ae == "CT1"
    assert list((archive.root / ".tmp").iterdir()) == []
    assert archive.reconcile() == 0
