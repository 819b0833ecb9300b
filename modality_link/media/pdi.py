"""IHE Portable Data for Imaging content (IHE RAD TF-1 §15, TF-3 §4.47).

``README.TXT`` at the root (creator, product and version, contact, date,
what is on the disc) and the optional web index ``INDEX.HTM``: plain HTML,
no script, no autorun. Neither file is referenced by the DICOMDIR, which
describes DICOM instances only. Both are UTF-8 (docs/design.md "Character
sets"): names are decoded from each instance's own character set, so they show
as the source meant them whatever (0008,0005) it used; INDEX.HTM declares
``charset=UTF-8`` and escapes every value as HTML.
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Iterable

import modality_link
from modality_link.media.fileset import PatientNode
from modality_link.media.header import Header

#: Upper bound of the INDEX.HTM markup, and per patient, study and series row
#: (excluding the text of the values, counted separately): used by spanning.
INDEX_BASE_BYTES = 2048
INDEX_ROW_BYTES = 256
#: Upper bound of README.TXT without the free texts (creator, contact) and the patient lines.
README_BASE_BYTES = 2048
#: Upper bound of one patient line of README.TXT, excluding the text of its values.
README_ROW_BYTES = 64


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _h(value: object) -> str:
    return html.escape(_text(value))


def _first_header(patient: PatientNode) -> Header:
    return next(iter(next(iter(patient.studies.values())).series.values())).instances[0].header


def _date(value: object) -> str:
    s = _text(value)
    return f"{s[0:4]}-{s[4:6]}-{s[6:8]}" if len(s) == 8 and s.isdigit() else s


def _counts(patients: dict[str, PatientNode]) -> tuple[int, int, int, int]:
    studies = [st for p in patients.values() for st in p.studies.values()]
    series = [se for st in studies for se in st.series.values()]
    return len(patients), len(studies), len(series), sum(len(se.instances) for se in series)


def readme_text(
    patients: dict[str, PatientNode],
    fileset_id: str,
    disc: int,
    discs: int,
    creator: str,
    contact: str,
    profile: str,
    web_index: bool,
    today: datetime.date | None = None,
) -> bytes:
    """The IHE PDI ``README.TXT`` (CR LF line ends, UTF-8), listing the patients on the disc."""
    today = today or datetime.date.today()
    n_pat, n_study, n_series, n_inst = _counts(patients)
    lines = [
        "DICOM INTERCHANGE MEDIUM",
        "",
        "This disc holds medical images and related data in the DICOM format",
        "(Digital Imaging and Communications in Medicine, PS3.10/PS3.11/PS3.12),",
        "readable by any DICOM viewer. Open the DICOMDIR file at the root of the",
        "disc with the viewer. The disc contains no viewer and starts no program.",
        "",
        f"Created by:        {creator}",
        f"Product:           modality_link {modality_link.__version__}",
        f"Contact:           {contact or '-'}",
        f"Date of creation:  {today.isoformat()}",
        f"File-set ID:       {fileset_id}",
        f"Application profile: {profile}",
        f"Disc:              disc {disc} of {discs}",
        "",
        "Contents of this disc:",
        f"  {n_pat} patient(s), {n_study} study(ies), {n_series} series, {n_inst} instance(s)",
        "",
        "Patients on this disc:",
        *(f"  {_text(h.get('PatientName'))} (ID {_text(h.get('PatientID'))}, {len(p.studies)} study(ies))"
          for p, h in ((p, _first_header(p)) for p in patients.values())),
        "",
        "  DICOMDIR     DICOM directory of the file-set (PS3.10)",
        "  DICOM/       the DICOM files (no file name extension)",
        "  README.TXT   this file",
    ]
    if web_index:
        lines.append("  INDEX.HTM    list of the patients, studies and series (web browser)")
    if discs > 1:
        lines += [
            "",
            f"The data set spans {discs} discs; each disc is a complete DICOM file-set",
            "with its own DICOMDIR. Load every disc to see all the data.",
        ]
    text = "\r\n".join(lines) + "\r\n"
    return text.encode("utf-8")


def index_html(patients: dict[str, PatientNode], fileset_id: str, disc: int, discs: int) -> bytes:
    """The optional IHE PDI web index ``INDEX.HTM``: a table, no JavaScript."""
    out = [
        '<!DOCTYPE html PUBLIC "-//W3C//DTD HTML 4.01//EN" "http://www.w3.org/TR/html4/strict.dtd">',
        "<html><head>",
        '<meta http-equiv="Content-Type" content="text/html; charset=UTF-8">',
        f"<title>DICOM file-set {_h(fileset_id)}</title>",
        "</head><body>",
        f"<h1>DICOM file-set {_h(fileset_id)} (disc {disc} of {discs})</h1>",
        "<p>This disc holds DICOM data readable by any DICOM viewer: open the DICOMDIR file.</p>",
        '<table border="1" cellpadding="3">',
        "<tr><th>Patient</th><th>Study</th><th>Series</th><th>Instances</th></tr>",
    ]
    for patient in patients.values():
        first = _first_header(patient)
        out.append(
            f'<tr><td colspan="4"><b>{_h(first.get("PatientName"))}</b> (ID {_h(first.get("PatientID"))}, '
            f'born {_h(_date(first.get("PatientBirthDate")))}, sex {_h(first.get("PatientSex"))})</td></tr>'
        )
        for study in patient.studies.values():
            h = next(iter(study.series.values())).instances[0].header
            out.append(
                f'<tr><td></td><td colspan="3">{_h(_date(h.get("StudyDate")))} {_h(h.get("StudyDescription"))} '
                f'(accession {_h(h.get("AccessionNumber"))}, study ID {_h(h.get("StudyID"))})</td></tr>'
            )
            for series in study.series.values():
                h = series.instances[0].header
                out.append(
                    f'<tr><td></td><td></td><td>{_h(h.get("Modality"))} #{_h(h.get("SeriesNumber"))} '
                    f'{_h(h.get("SeriesDescription"))}</td><td>{len(series.instances)}</td></tr>'
                )
    out += ["</table>", f"<p>Made by modality_link {_h(modality_link.__version__)}.</p>", "</body></html>", ""]
    return "\r\n".join(out).encode("utf-8")


def text_bound(values: Iterable[object]) -> int:
    """Upper bound of the bytes `values` take in UTF-8, once escaped in INDEX.HTM."""
    return sum(10 * len(_text(v)) for v in values)
