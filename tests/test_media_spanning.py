"""Spanning a set over several small discs; each disc is a valid file-set on its own."""

from __future__ import annotations

import subprocess
from collections import Counter

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from modality_link.media import MediaError, MediaOptions, build_media, plan_discs
from modality_link.media.options import disc_fileset_id

from tests.support.instances import ImplicitVRLittleEndian, make_series
from tests.support.tools import require_tool

CAPACITY = 3 * 1024 * 1024


@pytest.fixture(scope="module")
def spanned(tmp_path_factory):
    root = tmp_path_factory.mktemp("span")
    src = root / "src"
    study = generate_uid()
    series = {}
    # 128 KiB per image: three ~1.3 MB series, and one 3.9 MB series (larger than a disc)
    series["ct1"] = make_series(src, 10, study_uid=study, rows=256, columns=256, series_number=1)
    series["mr"] = make_series(src, 10, modality="MR", study_uid=study, rows=256, columns=256, series_number=2,
                               transfer_syntax=ImplicitVRLittleEndian)
    series["big"] = make_series(src, 30, patient_id="PID002", rows=256, columns=256)
    series["ct2"] = make_series(src, 10, patient_id="PID003", rows=256, columns=256)
    files = [p for paths in series.values() for p in paths]
    options = MediaOptions(fileset_id="SPANTEST", capacity_bytes=CAPACITY, contact="x")
    plans = plan_discs(files, options)
    results = build_media(files, root / "out", options)
    return {"root": root, "series": series, "files": files, "plans": plans, "results": results}


def _extract(iso, dest):
    proc = subprocess.run([require_tool("xorriso"), "-osirrox", "on", "-indev", str(iso), "-extract", "/", str(dest)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return dest


def test_discs_fit_and_match_the_plan(spanned):
    results = spanned["results"]
    assert len(results) >= 3
    for plan, result in zip(spanned["plans"], results, strict=True):
        assert result.iso_path.name == f"SPANTEST_{result.index}.iso"
        assert result.iso_bytes == result.iso_path.stat().st_size <= CAPACITY
        assert result.iso_bytes <= plan.estimated_bytes
        assert result.count == len(results)
        assert result.fileset_id == disc_fileset_id("SPANTEST", result.index, len(results))


def test_each_disc_is_a_valid_fileset_and_instances_appear_once(spanned, tmp_path):
    seen = Counter()
    for result in spanned["results"]:
        x = _extract(result.iso_path, tmp_path / f"d{result.index}")
        proc = subprocess.run([require_tool("dciodvfy"), str(x / "DICOMDIR")], capture_output=True, text=True,
                              encoding="latin-1")
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
        assert not errors
        readme = (x / "README.TXT").read_text("ascii")
        assert f"disc {result.index} of {result.count}" in readme
        ds = dcmread(x / "DICOMDIR")
        assert ds.FileSetID == result.fileset_id
        for rec in ds.DirectoryRecordSequence:
            if rec.DirectoryRecordType == "IMAGE":
                assert x.joinpath(*rec.ReferencedFileID).is_file()
                seen[rec.ReferencedSOPInstanceUIDInFile] += 1
    expected = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in spanned["files"]}
    assert set(seen) == expected and set(seen.values()) == {1}


def test_series_split_only_when_larger_than_a_disc(spanned):
    by_disc = {}
    for result in spanned["results"]:
        for f in result.instances:
            by_disc.setdefault(f.source, result.index)
    for name, paths in spanned["series"].items():
        discs = {by_disc[p] for p in paths}
        if name == "big":
            assert len(discs) >= 2
        else:
            assert len(discs) == 1, name


def test_instance_larger_than_disc_is_an_error(tmp_path):
    files = make_series(tmp_path, 1, rows=1024, columns=1024)  # 2 MiB
    with pytest.raises(MediaError, match="does not fit"):
        plan_discs(files, MediaOptions(capacity_bytes=1024 * 1024))
