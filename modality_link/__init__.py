"""modality_link: DICOM connectivity for an imaging modality's console."""

__version__ = "0.1.0"

#: Implementation Class UID (PS3.7 D.3.3.2), sent in A-ASSOCIATE and File Meta (0002,0012).
#: Derived from the UUID-based root 2.25 (PS3.5 B.2).
IMPLEMENTATION_CLASS_UID = "2.25.303082821956123276942924895321046201115"
#: Implementation Version Name (0002,0013), at most 16 characters.
IMPLEMENTATION_VERSION_NAME = "MODLINK_010"
