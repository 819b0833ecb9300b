"""What the tests share, one module per concern.

* :mod:`.tools`: reference programs from Debian packages (:func:`~.tools.require_tool`: outside
  CI a missing one skips the test, in CI it fails it);
* :mod:`.waiting`: :func:`~.waiting.wait_until`, the one poller with a deadline, and
  :func:`~.waiting.wait_port`;
* :mod:`.service`: the service under test, as a ``modality-link serve`` subprocess
  (:class:`~.service.ServiceProcess`) or in this process (:class:`~.service.InProcessService`),
  the homes they run on and IPC calls to them (``tests/conftest.py`` makes fixtures of both);
* :mod:`.peers`: DICOM peers that are not ours (DCMTK storescp, Orthanc, python3-odil);
* :mod:`.instances`: DICOM files to send, import and burn, and their data set bytes;
* :mod:`.acceptor`: a disk server in this process and raw DICOM Upper Layer streams (PS3.8 §9.3);
* :mod:`.corpus`: pydicom's test corpus, case by case, and the data set comparison;
* :mod:`.transcode`: the same sources in every transfer syntax;
* :mod:`.discs`: ISO 9660 images for the drive tests, and discs read back and checked.
"""

from pathlib import Path

#: The repository's root folder.
REPO = Path(__file__).resolve().parents[2]
