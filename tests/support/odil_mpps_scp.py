"""An MPPS SCP that is not ours: Debian's python3-odil (run with /usr/bin/python3 only).

Usage: /usr/bin/python3 tests/peers/odil_mpps_scp.py PORT OUTDIR
Accepts associations one after the other; every N-CREATE / N-SET is written to OUTDIR as
NNN-create.json / NNN-set.json: {"uid": ..., "dataset": <DICOM JSON model>}.
"""

import json
import os
import sys

import odil

MPPS = "1.2.840.10008.3.1.2.3.3"
SYNTAXES = [odil.registry.ImplicitVRLittleEndian, odil.registry.ExplicitVRLittleEndian]


def main() -> int:
    port, outdir = int(sys.argv[1]), sys.argv[2]
    counter = [0]

    def save(kind, uid, ds):
        counter[0] += 1
        path = os.path.join(outdir, f"{counter[0]:03d}-{kind}.json")
        with open(path + ".tmp", "w") as fh:
            json.dump({"uid": uid, "dataset": json.loads(odil.as_json(ds))}, fh)
        os.replace(path + ".tmp", path)

    def on_create(message):
        save("create", message.get_affected_sop_instance_uid(), message.get_data_set())
        return 0

    def on_set(message):
        save("set", message.get_requested_sop_instance_uid(), message.get_data_set())
        return 0

    print("ready", flush=True)
    while True:
        assoc = odil.Association()
        try:
            assoc.receive_association("v4", port)
        except Exception as exc:  # a probe connection or a bad request: keep serving
            print(f"odil_mpps_scp: association refused: {exc}", file=sys.stderr, flush=True)
            continue
        dispatcher = odil.SCPDispatcher(assoc)
        create = odil.NCreateSCP(assoc)
        create.set_callback(on_create)
        nset = odil.NSetSCP(assoc)
        nset.set_callback(on_set)
        dispatcher.set_ncreate_scp(create)
        dispatcher.set_nset_scp(nset)
        try:
            while True:
                dispatcher.dispatch()
        except odil.AssociationReleased:
            pass
        except odil.AssociationAborted:
            pass
        except Exception as exc:
            print(f"odil_mpps_scp: {exc}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
