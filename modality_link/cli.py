"""`modality-link`: the command line (a contract: docs/design.md "The command line").

`serve` runs the service; every other command except `config`, `node` and `demo` is a thin
client of the running service over IPC. `config` and `node` edit the config file (so that a
service engineer can configure before the first start) and, when a service runs, ask it to
reload.

Exit codes: one table (:data:`EXIT_CODES`, docs/cli.md "Exit codes"), applied to every command
by :func:`exit_code` in :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence

from modality_link import __version__
from modality_link.home import Home
from modality_link.ipc import IpcClient, IpcError, NotRunning
from modality_link.media.profiles import PROFILES

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3
#: The exit code of every command (docs/cli.md "Exit codes").
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILED: "the operation failed (a peer refused or did not answer, a job failed, a file was refused)",
    EXIT_USAGE: "invalid usage: a wrong option, an invalid configuration value or file, an unknown node",
    EXIT_NOT_RUNNING: "no service running (the command needs one)",
}
#: Ctrl-C (128 + SIGINT), as a shell reports it
EXIT_INTERRUPTED = 130


def _out(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _call(home: Home, method: str, **params: Any) -> Any:
    with IpcClient(home.socket_path) as client:
        return client.call(method, **params)


def _notify_reload(home: Home) -> None:
    try:
        _call(home, "config.reload")
        print("the running service reloaded its configuration")
    except NotRunning:
        pass


# -- commands -----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace, home: Home) -> int:
    from modality_link.service import Service, ServiceError

    service = Service(home)
    try:
        service.start()
    except (ServiceError, OSError) as exc:
        print(f"modality-link serve: {exc}", file=sys.stderr)
        service.stop()
        return EXIT_FAILED
    service.run_forever()
    return EXIT_OK


def cmd_install_service(args: argparse.Namespace, home: Home) -> int:
    from pathlib import Path

    from modality_link import service_unit

    folder = args.service_home or args.home  # the subcommand's --home, else the global one
    inst = service_unit.Installation(
        user=args.user, home=Path(folder) if folder else service_unit.DEFAULT_HOME,
        root=Path(args.root).absolute(), groups=service_unit.default_groups(),
    )
    try:
        if args.dry_run:
            service_unit.check(inst, as_root=False)
            for step in service_unit.plan(inst):
                print(f"would {step}")
            print(f"--- {inst.unit_path}")
            print(service_unit.render_unit(inst), end="")
            return EXIT_OK
        for step in service_unit.install(inst):
            print(step)
    except service_unit.InstallError as exc:
        print(f"modality-link install-service: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if inst.system:
        print(f"start it now with: systemctl start {service_unit.UNIT_NAME}")
        print(f"its log: journalctl -u {service_unit.UNIT_NAME} (and {inst.home}/logs)")
        print(f"the command line finds it with: export MODALITY_LINK_HOME={inst.home}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, home: Home) -> int:
    from modality_link.demo import run_demo

    return run_demo(images=args.images, keep=args.keep)


def cmd_status(args: argparse.Namespace, home: Home) -> int:
    st = _call(home, "status")
    if args.json:
        _out(st)
        return EXIT_OK
    print(f"modality_link {st['version']} (pid {st['pid']}), home {st['home']}, up {st['uptime_s']} s")
    for name, lst in st["listeners"].items():
        state = "listening" if lst["running"] else "stopped"
        print(f"  {name}: {lst['ae_title']} port {lst['port']} {state}")
    print(f"  archive: {st['archive']['studies']} studies, {st['archive']['instances']} instances")
    for a in st["alerts"]:
        print(f"  ALERT {a['level']} {a['code']}: {a['message']}")
    for w in st.get("warnings", []):
        print(f"  WARNING {w}")
    return EXIT_OK


def cmd_config(args: argparse.Namespace, home: Home) -> int:
    from pathlib import Path

    from modality_link import config

    home.ensure()
    if args.action == "show":
        print(home.config_path.read_text(encoding="utf-8") if home.config_path.exists() else "", end="")
    elif args.action == "get":
        value = config.get_value(config.load(home.config_path), args.key)
        print(json.dumps(value) if not isinstance(value, str) else value)
    elif args.action in ("set", "unset"):
        if args.action == "set":
            cfg = config.set_value(home.config_path, args.key, args.value)
        else:
            cfg = config.unset_value(home.config_path, args.key)
        print(f"{args.key} = {json.dumps(config.get_value(cfg, args.key), ensure_ascii=False)}")
        _print_warnings(config.warnings(cfg))
        _notify_reload(home)
    elif args.action == "validate":
        return _validate_file(home.config_path, f"{home.config_path}: valid")
    elif args.action == "export":
        text = home.config_path.read_text(encoding="utf-8") if home.config_path.exists() else \
            config.dumps(config.load(home.config_path))
        config.load(home.config_path)  # only a valid configuration is exported
        Path(args.file).write_text(text, encoding="utf-8")
        print(f"configuration written to {args.file}")
    elif args.action == "import":
        code = _validate_file(Path(args.file), f"{args.file}: valid")
        if code != EXIT_OK:
            print(f"modality-link: {home.config_path} not changed", file=sys.stderr)
            return code
        config.write_private(home.config_path, Path(args.file).read_bytes())
        print(f"{home.config_path}: replaced by {args.file}")
        _notify_reload(home)
    return EXIT_OK


def _validate_file(path: Any, valid: str) -> int:
    """Every error of a configuration file at once (exit 2 if any), then its warnings."""
    from modality_link import config

    _, errors = config.read_file(path) if path.exists() else ("", [])
    for error in errors:
        print(f"modality-link: invalid configuration: {error}", file=sys.stderr)
    if errors:
        print(f"modality-link: {path}: {len(errors)} error(s)", file=sys.stderr)
        return EXIT_USAGE
    print(valid)
    _print_warnings(config.warnings(config.load(path)))
    return EXIT_OK


def _print_warnings(warnings: list[str]) -> None:
    for w in warnings:
        print(f"modality-link: warning: {w}", file=sys.stderr)


def _node_line(name: str, node: dict[str, Any]) -> str:
    return f"{name}: {node['ae_title']}@{node['host']}:{node['port']} roles={','.join(node['roles'])}"


def cmd_node(args: argparse.Namespace, home: Home) -> int:
    import dataclasses

    from modality_link import config

    home.ensure()
    cfg = config.load(home.config_path)
    if args.action == "list":
        nodes = {n: vars(node) for n, node in cfg.nodes.items()}
        if args.json:
            _out(nodes)
        else:
            for n, node in nodes.items():
                print(_node_line(n, node))
        return EXIT_OK
    if args.action == "show":
        shown = dataclasses.asdict(cfg.node(args.name))
        if args.json:
            _out(shown)
        else:
            print(f"[nodes.{args.name}]")
            for key, value in shown.items():
                print(f"{key} = {json.dumps(value, ensure_ascii=False)}")
        return EXIT_OK
    if args.action == "add":
        if any(n.lower() == args.name.lower() for n in cfg.nodes):
            raise config.ConfigError(f"nodes.{args.name}: duplicate node name (remove it first)")
        roles = [r.strip() for r in args.roles.split(",") if r.strip()]
        cfg.nodes[args.name] = config.Node(ae_title=args.ae, host=args.host, port=args.port, roles=roles)
        config.save(cfg, home.config_path)
        print(f"node {args.name} added")
    elif args.action == "edit":
        edited = cfg.node(args.name)
        changes = {"ae_title": args.ae, "host": args.host, "port": args.port, "auto_send": args.auto_send,
                   "roles": None if args.roles is None else [r.strip() for r in args.roles.split(",") if r.strip()]}
        changed = {k: v for k, v in changes.items() if v is not None}
        if not changed:
            print("modality-link node edit: give what to change (--ae, --host, --port, --roles, --auto-send)",
                  file=sys.stderr)
            return EXIT_USAGE
        for key, value in changed.items():
            setattr(edited, key, value)
        config.save(cfg, home.config_path)
        print(_node_line(args.name, vars(edited)))
        _print_warnings(config.warnings(cfg))
    elif args.action == "remove":
        cfg.node(args.name)
        del cfg.nodes[args.name]
        config.save(cfg, home.config_path)
        print(f"node {args.name} removed")
    _notify_reload(home)
    return EXIT_OK


def cmd_echo(args: argparse.Namespace, home: Home) -> int:
    if not args.all and not args.name:
        print("modality-link echo: give a node name or --all", file=sys.stderr)
        return EXIT_USAGE
    results = _call(home, "nodes.echo", name=args.name, all=args.all, **({"services": True} if args.services else {}))
    for r in results:
        if args.services:
            print(f"{r['node']}: {'OK' if r['ok'] else 'FAILED'} {r['rtt_ms']:.1f} ms {r['message']}")
            for c in r["services"]:
                print(f"  {c['role']:<12} {c['name']} ({c['sop_class']}): {c['detail']}")
            continue
        status = f"0x{r['status']:04X}" if r["status"] is not None else "-"
        print(f"{r['node']}: {'OK' if r['ok'] else 'FAILED'} status {status} {r['rtt_ms']:.1f} ms {r['message']}")
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_FAILED


def cmd_logs(args: argparse.Namespace, home: Home) -> int:
    """The service's log, filtered (:mod:`modality_link.logfile`)."""
    from modality_link import logfile

    keep = logfile.Filter(level=args.level, job=args.job)
    lines = logfile.read(home.log_dir, keep)
    if args.lines:
        from collections import deque

        lines = iter(deque(lines, maxlen=args.lines))
    for line in lines:
        print(line)
    if args.follow:
        sys.stdout.flush()
        for line in logfile.follow(home.log_dir, keep):
            print(line, flush=True)
    return EXIT_OK


def cmd_alerts(args: argparse.Namespace, home: Home) -> int:
    if args.action == "ack":
        if args.id is None:
            print("modality-link alerts ack: give the alert's ID (modality-link alerts lists them)", file=sys.stderr)
            return EXIT_USAGE
        _call(home, "alerts.ack", id=args.id)
        print(f"alert {args.id} acknowledged")
        return EXIT_OK
    alerts = _call(home, "alerts.list", include_cleared=args.all)
    if args.json:
        _out(alerts)
        return EXIT_OK
    if not alerts:
        print("no alerts")
    for a in alerts:
        print(f"{a['id']:>5} {_when(a['time'])} {a['level']:<7} {a['code']}: {a['message']}"
              + (" (acknowledged)" if a["cleared"] else ""))
    return EXIT_OK


def cmd_selftest(args: argparse.Namespace, home: Home) -> int:
    from modality_link import selftest

    try:
        report = _call(home, "selftest")
    except NotRunning:  # the checks run here (docs/design.md "Self-test")
        report = selftest.run_directly(home).to_dict()
    if args.json:
        _out(report)
    else:
        for line in selftest.table(selftest.Check(**c) for c in report["checks"]):
            print(line)
        failed = sum(not c["ok"] for c in report["checks"])
        print(f"{'all checks passed' if report['ok'] else f'{failed} check(s) failed'} "
              f"({'in the running service' if report['mode'] == 'service' else 'no service running: run here'})")
    return EXIT_OK if report["ok"] else EXIT_FAILED


def cmd_import(args: argparse.Namespace, home: Home) -> int:
    import os

    paths = [os.path.abspath(p) for p in args.paths]
    res = _import_with_progress(home, paths)
    print(f"imported {res['imported']} file(s)")
    for f in res["failed"]:
        print(f"refused {f['path']}: {f['error']}", file=sys.stderr)
    return EXIT_OK if not res["failed"] else EXIT_FAILED


def _files_to_import(paths: list[str]) -> int:
    """How many files ``archive.import`` will read (folders recursively, DICOMDIR skipped)."""
    import os

    count = 0
    for path in paths:
        if not os.path.isdir(path):
            count += 1
            continue
        for _, _, files in os.walk(path):
            count += sum(name != "DICOMDIR" for name in files)
    return count


def _import_with_progress(home: Home, paths: list[str]) -> dict[str, Any]:
    """``archive.import`` with its progress (files done of total) on the progress screen: each
    ``instance.stored`` event while the call runs is one more file in."""
    import threading

    from modality_link.progress import Screen

    total = _files_to_import(paths)
    screen = Screen(unit="files")
    label = "import"
    screen.update(label, label, 0, total, f"{total} file(s) to read")
    done = threading.Event()

    def count(events: IpcClient) -> None:
        stored = 0
        while not done.is_set():
            try:
                ev = events.next_event(0.2)
            except (OSError, NotRunning, ValueError):
                return
            if ev is not None and ev.get("type") == "instance.stored":
                stored = min(stored + 1, total)
                screen.update(label, label, stored, total, "reading")

    with IpcClient(home.socket_path, timeout=None) as events:
        events.call("events.subscribe")
        counter = threading.Thread(target=count, args=(events,), daemon=True)
        counter.start()
        try:
            res: dict[str, Any] = _call(home, "archive.import", paths=paths)
        finally:
            done.set()
            counter.join(2.0)
    screen.update(label, label, res["imported"] + len(res["failed"]), total,
                  f"{res['imported']} imported, {len(res['failed'])} refused")
    screen.close()
    return res


def _when(t: float | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def cmd_studies(args: argparse.Namespace, home: Home) -> int:
    if args.action in ("protect", "unprotect"):
        if not args.uid:
            print(f"modality-link: studies {args.action} STUDY_UID", file=sys.stderr)
            return EXIT_USAGE
        res = _call(home, f"studies.{args.action}", study_uid=args.uid)
        if args.json:
            _out(res)
        else:
            print(f"{res['study_uid']}: {'protected' if res['protected'] else 'not protected'}")
        return EXIT_OK
    studies = _read_list(home, "studies.list", "studies")
    if args.json:
        _out(studies)
        return EXIT_OK
    for s in studies:
        nodes = " ".join(
            f"{n}:{c['sent']}sent/{c['committed']}committed" for n, c in s.get("nodes", {}).items()
        )
        print(
            f"{s['study_uid']}  {s['patient_id']:<12} {s['patient_name']:<28} "
            f"{s['study_date']} {s['modalities'] or '':<5} {s['instances']:>5} instances "
            f"used {_when(s.get('last_used'))}{' PROTECTED' if s.get('protected') else ''} {nodes}".rstrip()
        )
    return EXIT_OK


def cmd_cleanup(args: argparse.Namespace, home: Home) -> int:
    res = _call(home, "cleanup", dry_run=args.dry_run)
    if args.json:
        _out(res)
        return EXIT_OK
    before, after = res["before"], res["after"]
    of = "of the quota" if before["quota"] else "of the file system less the reserve"
    print(f"archive {before['percent']:.1f} % {of} used (high mark {res['high']} %, low mark {res['low']} %)")
    if not res["above_high"]:
        print("below the high mark: nothing to delete")
    verb = "would delete" if res["dry_run"] else "deleted"
    for st in res["deleted"]:
        print(f"{verb} {st['study_uid']}  {st['patient_id']:<12} {st['patient_name']:<28} {st['study_date']} "
              f"{st['instances']:>5} instances {st['bytes'] / 1e6:8.1f} MB  last used {_when(st['last_used'])}")
    if res["deleted"]:
        print(f"{verb} {len(res['deleted'])} study(ies), {res['deleted_bytes'] / 1e6:.1f} MB: "
              f"{after['percent']:.1f} % {'would be' if res['dry_run'] else 'is'} used")
    for reason, kept in res["blocked"].items():
        print(f"kept ({reason}): {kept['studies']} study(ies), {kept['bytes'] / 1e6:.1f} MB")
    return EXIT_OK


def cmd_memory(args: argparse.Namespace, home: Home) -> int:
    import os

    if args.action == "export":
        if not args.uid or not args.file:
            print("modality-link: memory export SOP_INSTANCE_UID FILE", file=sys.stderr)
            return EXIT_USAGE
        res = _call(home, "memory.fetch", sop_instance_uid=args.uid, path=os.path.abspath(args.file))
        print(f"{res['path']}: {res['bytes']} bytes")
        return EXIT_OK
    if args.action == "clear":
        print(f"cleared {_call(home, 'memory.clear')['cleared']} instance(s)")
        return EXIT_OK
    cache = _call(home, "memory.list")
    if args.json:
        _out(cache)
        return EXIT_OK
    print(f"memory server: {cache['instances']} instance(s), {cache['bytes'] / 1e6:.1f} MB "
          f"of {cache['budget_bytes'] / 1e6:.0f} MB")
    for st in cache["studies"]:
        print(f"{st['study_uid']}  {st['patient_id']:<12} {st['patient_name']:<28} {st['study_date']} "
              f"{st['instances']:>5} instances {st['bytes'] / 1e6:8.1f} MB")
        for se in st["series"]:
            print(f"  {se['series_uid']}  {se['modality']:<4} #{se['series_number']:<4} "
                  f"{se['instances']:>5} instances {se['bytes'] / 1e6:8.1f} MB")
    return EXIT_OK


def cmd_worklist(args: argparse.Namespace, home: Home) -> int:
    params = {k: v for k, v in {
        "node": args.node, "date": args.date, "patient_name": args.patient_name,
        "patient_id": args.patient_id, "accession": args.accession, "modality": args.modality,
    }.items() if v is not None}
    res = _call(home, "worklist.query", **params)
    if args.json:
        _out([i["dataset"] for i in res["items"]])
    else:
        for i in res["items"]:
            print(f"{i['sps_id']:<16} {i['patient_id']:<12} {i['patient_name']:<32} {i['accession']:<12} "
                  f"{i['start_date']} {i['start_time'][:4]} {i['modality']:<3} {i['description']}")
    if res["partial"]:
        print(f"modality-link: warning: {res['message']}", file=sys.stderr)
    return EXIT_OK


def cmd_exam(args: argparse.Namespace, home: Home) -> int:
    import os

    if args.action == "start":
        if not args.item and not (args.patient_id and args.patient_name):
            print("modality-link exam start: give --item SPS_ID or --patient-id and --patient-name", file=sys.stderr)
            return EXIT_USAGE
        params = {"item": args.item} if args.item else {"patient_id": args.patient_id, "patient_name": args.patient_name}
        res = _call(home, "exam.start", **params)
        if args.json:
            _out(res)
        else:
            print(res["exam_id"], flush=True)
            print(_mpps_outcome(home, res))
    elif args.action == "list":
        _show_rows(_read_list(home, "exam.list", "exams"), args.json, _exam_line)
    elif args.action == "show":
        res = _call(home, "exam.show", exam_id=args.exam_id)
        if args.json:
            _out(res)
        else:
            print(f"exam {res['exam_id']}: {res['state']}, study {res['study_uid']}, SPS {res['sps_id'] or '-'}, "
                  f"{res['objects']} object(s)")
            for se in res["series"]:
                print(f"  series {se['series_uid']}: {se['instances']} instance(s)"
                      f"{', complete' if se['complete'] else ''}")
            for m in res["mpps"]:
                print(f"  MPPS {_MPPS_NAMES.get(m['kind'], m['kind'])} to {m['node']}: {_mpps_state(m)}")
    elif args.action == "add":
        res = _call(home, "exam.add_image", exam_id=args.exam_id, paths=[os.path.abspath(p) for p in args.paths])
        print(f"exam {res['exam_id']}: {len(res['added'])} object(s) archived")
    elif args.action == "series-complete":
        res = _call(home, "exam.series_complete", exam_id=args.exam_id, series_uid=args.series_uid)
        if res["already_complete"]:
            print(f"exam {res['exam_id']}: series {res['series_uid']} was already complete")
        else:
            print(f"exam {res['exam_id']}: series {res['series_uid']} complete, {res['instances']} object(s)"
                  + _jobs_note(res["jobs"]))
    elif args.action == "end":
        res = _call(home, "exam.end", exam_id=args.exam_id, discontinue=args.discontinue)
        print(f"exam {res['exam_id']}: {res['state']}" + _jobs_note(res["jobs"]))
    return EXIT_OK


_MPPS_NAMES = {"create": "N-CREATE", "set": "N-SET"}


def _mpps_state(m: dict[str, Any]) -> str:
    """An MPPS outbox row (docs/ipc.md ``exam.show``) in words."""
    from modality_link.progress import clock

    if m["state"] == "queued" and (m["attempts"] or m["last_error"]):
        due = f", next attempt at {clock(m['next_attempt'])}" if m.get("next_attempt") else ""
        return f"queued for retry ({m['last_error'] or 'not answered'}{due})"
    if m["state"] == "failed":
        return f"failed: {m['last_error']}"
    return str(m["state"])


def _mpps_outcome(home: Home, exam: dict[str, Any], wait: float = 5.0) -> str:
    """The N-CREATE's outcome, waited for briefly: sent, failed with the reason, or queued for
    retry (it goes on in the service; ``exam show`` tells later)."""
    import time

    if not exam["mpps"]:
        return "MPPS: no node with the mpps role; no N-CREATE sent"
    end = time.monotonic() + wait
    with IpcClient(home.socket_path) as client:
        while True:
            create = client.call("exam.show", exam_id=exam["exam_id"])["mpps"][0]
            if create["state"] != "queued" or create["attempts"] or time.monotonic() >= end:
                break
            time.sleep(0.1)
    state = _mpps_state(create)
    if create["state"] == "queued" and not create["attempts"]:
        state = "not answered yet; it goes on in the service (see exam show)"
    return f"MPPS N-CREATE to {create['node']}: {state}"


def _exam_line(x: dict[str, Any]) -> str:
    mpps = ", ".join(f"{_MPPS_NAMES.get(m['kind'], m['kind'])} {m['state']}" for m in x["mpps"]) or "no MPPS"
    return (f"{x['exam_id']:>5} {x['state']:<13} {x['patient_id']:<12} {x['patient_name']:<28} "
            f"started {x['started'][:16].replace('T', ' ')} {mpps}")


def _jobs_note(jobs: list[int]) -> str:
    """", auto-send jobs 4, 5 queued" (or nothing when no node has a matching auto_send rule)."""
    if not jobs:
        return ""
    return f", auto-send job{'s' if len(jobs) > 1 else ''} {', '.join(map(str, jobs))} queued"


def _wait_job(home: Home, job_id: int) -> dict[str, Any]:
    """Follow a job and the jobs it queues (commit, resend) on one screen (modality_link.progress):
    a bar per job on a terminal, plain lines otherwise; each job's outcome as a last line."""
    from modality_link.progress import Screen, job_status

    screen = Screen()
    ended: set[int] = set()

    def show(job: dict[str, Any]) -> None:
        final = job["state"] in ("done", "failed", "cancelled")
        status = job_status(job)
        if not final:
            status = f"{job['state']}: {status}" if status else job["state"]
        screen.update(str(job["id"]), f"{job['kind']} job {job['id']}", job["done"] + job["failed"],
                      job["total"], status)
        if final and job["id"] not in ended:
            ended.add(job["id"])
            screen.say(f"job {job['id']} ({job['kind']} to {job['node']}): {job['state']}: {status}")

    try:
        with IpcClient(home.socket_path) as client:
            return client.follow_job(job_id, show)
    finally:
        screen.close()


def _interrupted(what: str, job_id: int) -> int:
    """Ctrl-C while following: the job is the service's; say so, exit 130 (128 + SIGINT)."""
    from modality_link.progress import went_on

    print("\n" + went_on(what, job_id), file=sys.stderr)
    return EXIT_INTERRUPTED


def _follow(home: Home, job_id: int) -> int:
    try:
        job = _wait_job(home, job_id)
    except KeyboardInterrupt:
        return _interrupted("job", job_id)
    return EXIT_OK if job["state"] == "done" else EXIT_FAILED


def cmd_send(args: argparse.Namespace, home: Home) -> int:
    res = _call(home, "send", study_uids=args.study_uids, node=args.to, commit=args.commit)
    print(f"job {res['job_id']} queued", flush=True)
    if not args.wait:
        return EXIT_OK
    return _follow(home, res["job_id"])


def cmd_query(args: argparse.Namespace, home: Home) -> int:
    keys = {}
    for kv in args.key or []:
        keyword, sep, value = kv.partition("=")
        if not sep:
            print(f"modality-link: -k {kv}: give KEYWORD=VALUE (an empty value returns the attribute)",
                  file=sys.stderr)
            return EXIT_USAGE
        keys[keyword] = value
    matches = _call(home, "query", node=args.node, level=args.level, keys=keys, model=args.model)
    if args.json:
        _out(matches)
        return EXIT_OK
    from pydicom.dataset import Dataset

    for m in matches:
        ds = Dataset.from_json(m)
        print("  ".join(f"{e.keyword}={e.value}" for e in ds if e.keyword != "QueryRetrieveLevel"))
    print(f"{len(matches)} match(es)")
    return EXIT_OK


def cmd_retrieve(args: argparse.Namespace, home: Home) -> int:
    res = _call(home, "retrieve", node=args.node, study_uid=args.study, patient_id=args.patient_id, to=args.to)
    print(f"job {res['job_id']} queued", flush=True)
    if not args.wait:
        return EXIT_OK
    return _follow(home, res["job_id"])


def _job_line(j: dict[str, Any]) -> str:
    from modality_link.progress import job_status

    status = job_status(j)
    return (
        f"{j['id']:>5} {j['kind']:<7} {j['node']:<12} {j['state']:<9} "
        f"{j['done']}/{j['total']} failed {j['failed']} attempts {j['attempts']}"
        + (f" ({status})" if status else "")
    )


def cmd_jobs(args: argparse.Namespace, home: Home) -> int:
    _show_rows(_read_list(home, "jobs.list", "jobs"), args.json, _job_line)
    return EXIT_OK


def _show_rows(rows: list[dict[str, Any]], as_json: bool, line: Callable[[dict[str, Any]], str]) -> None:
    """A list as JSON, or one line per row."""
    if as_json:
        _out(rows)
        return
    for row in rows:
        print(line(row))


def _read_list(home: Home, method: str, name: str) -> Any:
    """`method`'s result from the service; while none runs, the same list read from its database
    (read-only, modality_link.lists), with a note on stderr saying so."""
    from modality_link import lists

    try:
        return _call(home, method)
    except NotRunning as exc:
        try:
            db = lists.read_only(home)
        except lists.NoDatabase:
            raise exc from None
        try:
            rows = getattr(lists, name)(db)
        finally:
            db.close()
        print(f"modality-link: the service is not running ({exc}); this is its database as it left it",
              file=sys.stderr)
        return rows


def cmd_job(args: argparse.Namespace, home: Home) -> int:
    if args.action == "follow":
        job = _call(home, "jobs.show", id=args.id)
        if job["kind"] == "burn":
            return _follow_burn(home, args.id, yes=False)
        return _follow(home, args.id)
    method = {"show": "jobs.show", "retry": "jobs.retry", "cancel": "jobs.cancel"}[args.action]
    job = _call(home, method, id=args.id)
    if args.json:
        _out(job)
        return EXIT_OK
    print(_job_line(job))
    if args.action == "show":
        print(f"  created {job['created']}, last change {job['updated']}"
              + (f", next attempt {job['next_attempt']}" if job["next_attempt"] else ""))
        for a in job.get("attempt_history", []):
            print(f"  attempt {a['started']} - {a['ended'][11:]}: {a['outcome']}"
                  + (f": {a['error']}" if a["error"] else ""))
    for d in job["params"].get("discs", []) if job["kind"] == "burn" else []:
        print("  " + _disc_line(d))
    for item in job.get("failed_items", []):
        print(f"  failed  {item['item']}: {item['detail']}")
    for item in job.get("warning_items", []):
        print(f"  warning {item['item']}: {item['detail']}")
    return EXIT_OK


def _disc_line(d: dict[str, Any]) -> str:
    return f"disc {d['index']} of {d['count']} ({d['target']}): {d['state']} {d['message']}".rstrip()


def _progress_line(ev: dict[str, Any]) -> str:
    return f"disc {ev['disc']} of {ev['discs']}: {ev['phase']} {int(ev['fraction'] * 100):3d} %"


def _burn_cancel(args: argparse.Namespace, home: Home) -> int:
    if args.study_uids or args.drive or args.iso:
        print("modality-link burn: --cancel ID takes no studies, --drive or --iso", file=sys.stderr)
        return EXIT_USAGE
    burn = _call(home, "burn.cancel", id=args.cancel)
    if burn["stopping"]:
        print(f"burn {burn['id']}: {burn['state']}; it stops once the disc being written is finished")
    else:
        print(f"burn {burn['id']}: {burn['state']}")
    return EXIT_OK


def cmd_burn(args: argparse.Namespace, home: Home) -> int:
    import os

    if args.cancel is not None:
        return _burn_cancel(args, home)
    if not args.study_uids:
        print("modality-link burn: give the Study Instance UIDs to burn (or --cancel ID)", file=sys.stderr)
        return EXIT_USAGE
    if (args.drive is None) == (args.iso is None):
        print("modality-link burn: give either --drive DEV or --iso FILE", file=sys.stderr)
        return EXIT_USAGE
    params: dict[str, Any] = {"study_uids": args.study_uids}
    if args.drive is not None:
        params["drive"] = args.drive
    else:
        params["iso"] = os.path.abspath(args.iso)
    if args.profile:
        params["profile"] = args.profile
    if args.force:
        params["overwrite"] = True
    if not args.wait:
        burn = _call(home, "burn", **params)
        print(burn["id"])
        return EXIT_OK
    return _follow_burn(home, None, args.yes, params)


def _follow_burn(home: Home, burn_id: int | None, yes: bool, start: dict[str, Any] | None = None) -> int:
    """Follow a burn on the progress screen (modality_link.progress): the burn `start` starts
    (params of ``burn``), or burn `burn_id` already under way (``job follow``). Events are
    subscribed to before the burn starts or its state is read, so that none is missed."""
    from modality_link.progress import Screen

    screen = Screen(unit="%")
    try:
        with IpcClient(home.socket_path, timeout=None) as events, IpcClient(home.socket_path) as client:
            events.call("events.subscribe")
            if start is not None:
                burn = client.call("burn", **start)
                burn_id = burn["id"]
                print(f"{burn_id}: burning {len(start['study_uids'])} study(ies) to {burn['target']}", flush=True)
                if burn["state"] == "queued" and burn["detail"]:
                    print(f"{burn_id}: queued ({burn['detail']})", flush=True)
            assert burn_id is not None
            state = client.call("burn.status", id=burn_id)
            if start is None:
                print(f"{burn_id}: {state['state']} (burn to {state['target']})", flush=True)
            if state["state"] not in ("done", "failed", "cancelled"):
                if start is None and state.get("waiting_for_disc"):
                    if not _disc_prompt(client, burn_id, f"put blank disc {state['waiting_for_disc']} in", yes):
                        return EXIT_FAILED
                while True:
                    ev = events.next_event(1.0)
                    if ev is None:  # quiet: has it ended meanwhile (a burn.done missed)?
                        if client.call("burn.status", id=burn_id)["state"] in ("done", "failed", "cancelled"):
                            break
                        continue
                    if ev.get("id") != burn_id:
                        continue
                    if ev["type"] == "burn.progress":
                        screen.update(f"{ev['disc']}:{ev['phase']}",
                                      f"burn {burn_id} disc {ev['disc']} of {ev['discs']} {ev['phase']:<6}",
                                      int(ev["fraction"] * 100), 100, "")
                    elif ev["type"] == "burn.insert_disc":
                        screen.say(ev["message"])
                        if not _disc_prompt(client, burn_id, "", yes):
                            return EXIT_FAILED
                    elif ev["type"] == "burn.done":
                        break
            screen.close()
            status = client.call("burn.status", id=burn_id)
    except KeyboardInterrupt:
        screen.close()
        if burn_id is None:
            raise
        return _interrupted("burn", burn_id)
    for d in status["discs"]:
        print(_disc_line(d))
    if status["state"] != "done":
        print(f"modality-link burn: {status['error']}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{burn_id}: done")
    return EXIT_OK


def _disc_prompt(client: IpcClient, burn_id: int, message: str, yes: bool) -> bool:
    """Ask for the next blank disc (unless `yes`) and tell the service it is in."""
    if message:
        print(f"{burn_id}: {message}", flush=True)
    if not yes:
        try:
            input("Press Enter when the disc is in the drive (Ctrl-C to stop waiting) ")
        except EOFError:
            print("modality-link burn: no terminal to answer the disc prompt; use --yes", file=sys.stderr)
            return False
    client.call("burn.disc_inserted", id=burn_id)
    return True


def cmd_conformance(args: argparse.Namespace, home: Home) -> int:
    """The DICOM Conformance Statement (PS3.2 Annex A) of this installation's configuration."""
    from modality_link import conformance

    text = conformance.render(home.load_config(), args.format)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
        print(f"conformance statement written to {args.output}")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_drives(args: argparse.Namespace, home: Home) -> int:
    drives = _call(home, "drives.list")
    if args.json:
        _out(drives)
        return EXIT_OK
    if not drives:
        print("no drives found")
    for d in drives:
        m = d.get("media")
        if m is None:
            media = f"error: {d.get('error', 'unknown')}"
        elif not m["present"]:
            media = "no disc"
        else:
            free = m["free_bytes"]
            media = f"{m['kind'] or 'disc'} {m['state']}" + (f", {free} bytes free" if free is not None else "")
        print(f"{d['device']}: {d['description']}: {media}{' (busy)' if d.get('busy') else ''}")
    return EXIT_OK


# -- parser -------------------------------------------------------------------------------------

JSON_HELP = "print the result as JSON (for scripts)"


def config_epilog() -> str:
    """The lists `--help` shows: node roles and every configuration key with its default,
    generated from the configuration's dataclasses (modality_link.config)."""
    import dataclasses

    from modality_link import config

    lines = [f"node roles: {', '.join(config.ROLES)}", "", "configuration keys (default):"]
    for f in dataclasses.fields(config.Config):
        if f.name == "nodes":
            continue
        section = getattr(config.Config(), f.name)
        lines += [f"  {f.name}.{g.name} ({json.dumps(getattr(section, g.name))})"
                  if (f.name, g.name) != ("disk_server", "ae_title") else "  disk_server.ae_title (station.ae_title)"
                  for g in dataclasses.fields(section)]
    defaults = config.Node()
    lines += [f"  nodes.NAME.{g.name} ({json.dumps(getattr(defaults, g.name))})" for g in dataclasses.fields(defaults)]
    lines += ["", "exit codes: " + "; ".join(f"{code} {what}" for code, what in EXIT_CODES.items())]
    return "\n".join(lines)


def build_parser(lists: bool = False) -> argparse.ArgumentParser:
    """The command line; `lists`: put the lists of roles and keys into the help (they need the
    configuration module, which the thin IPC clients do not load)."""
    raw = argparse.RawDescriptionHelpFormatter
    epilog = config_epilog() if lists else None
    roles = "worklist, mpps, store, commit, qr"  # config.ROLES, without loading the configuration module
    p = argparse.ArgumentParser(prog="modality-link", description="DICOM connectivity for a modality console "
                                "(command list: docs/cli.md)", epilog=epilog, formatter_class=raw)
    p.add_argument("--home", help="home folder (default $MODALITY_LINK_HOME or ~/.local/share/modality-link)")
    p.add_argument("--version", action="version", version=f"modality_link {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=raw, **kw)

    command("serve", "run the service in the foreground").set_defaults(func=cmd_serve)
    ins = command("install-service", "install the systemd unit (and its system user) that starts the service "
                                     "with the OS")
    ins.add_argument("--user", default="modality-link", help="the system user the service runs as, created if "
                                                             "missing (default modality-link)")
    ins.add_argument("--home", dest="service_home", metavar="DIR",
                     help="the service's home (default /var/lib/modality-link)")
    ins.add_argument("--root", default="/", metavar="DIR",
                     help="install below DIR instead of the running system: no user, no systemctl (packaging)")
    ins.add_argument("--dry-run", action="store_true", help="print what would be done and the unit, change nothing")
    ins.set_defaults(func=cmd_install_service)
    d = command("demo", "service + simulated hospital in a temporary home, end to end")
    d.add_argument("--images", type=int, default=20, help="images of the simulated exam (default 20)")
    d.add_argument("--keep", action="store_true", help="keep the temporary home")
    d.set_defaults(func=cmd_demo)

    s = command("status", "the service's state, its alerts and settings that stop peers reaching it")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=cmd_status)

    c = command("config", "show, get, set, unset, validate, export or import the configuration", epilog=epilog)
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    csub.add_parser("show", help="print the config file")
    g = csub.add_parser("get", help="print one value")
    g.add_argument("key", help="SECTION.KEY or nodes.NAME.KEY, e.g. station.ae_title (list: config --help)")
    st = csub.add_parser("set", help="set one value (validated; a running service reloads)")
    st.add_argument("key", help="SECTION.KEY or nodes.NAME.KEY, e.g. station.ae_title (list: config --help)")
    st.add_argument("value", help="the new value; a list is comma-separated")
    un = csub.add_parser("unset", help="put one value back to its default (the key leaves the file)")
    un.add_argument("key", help="SECTION.KEY or nodes.NAME.KEY")
    csub.add_parser("validate", help="check the config file: every error at once, then warnings")
    ex = csub.add_parser("export", help="copy the configuration (with its comments) to a file, to clone a console")
    ex.add_argument("file", help="the file to write")
    im = csub.add_parser("import", help="replace the configuration by a file, if the file is valid (every error "
                                        "listed otherwise)")
    im.add_argument("file", help="a config file, e.g. from config export")
    c.set_defaults(func=cmd_config)

    n = command("node", "remote DICOM nodes: list, show, add, edit, remove", epilog=epilog)
    nsub = n.add_subparsers(dest="action", required=True, metavar="ACTION")
    na = nsub.add_parser("add", help="add a node")
    na.add_argument("name", help="a name for the node (letters, digits, _ - .)")
    na.add_argument("--ae", required=True, help="its AE title")
    na.add_argument("--host", required=True, help="its host name or IP address")
    na.add_argument("--port", type=int, required=True, help="its DICOM port")
    na.add_argument("--roles", default="store", help=f"comma-separated, from {roles} (default store)")
    nl = nsub.add_parser("list", help="list the nodes")
    nl.add_argument("--json", action="store_true", help=JSON_HELP)
    ns = nsub.add_parser("show", help="every setting of one node")
    ns.add_argument("name", help="the node")
    ns.add_argument("--json", action="store_true", help=JSON_HELP)
    ne = nsub.add_parser("edit", help="change a node's address, roles or auto-send rule (other keys: "
                                      "config set nodes.NAME.KEY)")
    ne.add_argument("name", help="the node")
    ne.add_argument("--ae", help="its AE title")
    ne.add_argument("--host", help="its host name or IP address")
    ne.add_argument("--port", type=int, help="its DICOM port")
    ne.add_argument("--roles", help=f"comma-separated, from {roles} (replaces the list)")
    ne.add_argument("--auto-send", choices=("none", "exam", "series"), help="send each completed exam or series")
    nr = nsub.add_parser("remove", help="remove a node")
    nr.add_argument("name", help="the node")
    n.set_defaults(func=cmd_node)

    e = command("echo", "C-ECHO a configured node from the service, or (--services) ask which of its roles' "
                        "services it accepts")
    e.add_argument("name", nargs="?", help="the node")
    e.add_argument("--all", action="store_true", help="every configured node")
    e.add_argument("--services", action="store_true",
                   help="propose each role's SOP classes (store: CT, MR, SC storage; commit: Storage Commitment "
                        "Push Model; worklist: MWL FIND; mpps: MPPS; qr: Study Root FIND and MOVE) and report "
                        "each accepted or refused")
    e.set_defaults(func=cmd_echo)

    stt = command("selftest", "check home permissions, free space, the database, the archive, the listeners, "
                              "the AE identity, every node (C-ECHO) and the drives; exit 0 only if all pass")
    stt.add_argument("--json", action="store_true", help=JSON_HELP)
    stt.set_defaults(func=cmd_selftest)

    lg = command("logs", "print the service's log (the files in HOME/logs), filtered")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing new lines (Ctrl-C stops)")
    lg.add_argument("--job", type=int, metavar="ID", help="only the lines of job ID")
    lg.add_argument("--level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="DEBUG",
                    help="only lines of this level or above")
    lg.add_argument("--lines", "-n", type=int, metavar="N", help="only the last N lines (before --follow)")
    lg.set_defaults(func=cmd_logs)

    al = command("alerts", "list the service's alerts, or acknowledge one")
    al.add_argument("action", nargs="?", choices=["list", "ack"], default="list", help="list (default) or ack ID")
    al.add_argument("id", nargs="?", type=int, help="ack: the alert's ID")
    al.add_argument("--all", action="store_true", help="list: also the acknowledged ones")
    al.add_argument("--json", action="store_true", help=JSON_HELP)
    al.set_defaults(func=cmd_alerts)

    i = command("import", "import files or folders into the archive")
    i.add_argument("paths", nargs="+", help="DICOM files or folders")
    i.set_defaults(func=cmd_import)

    so = command("studies", "list the archive's studies; protect one from the disk clean-up, or not")
    so.add_argument("action", nargs="?", choices=["list", "protect", "unprotect"], default="list",
                    help="list (default), protect STUDY_UID or unprotect STUDY_UID")
    so.add_argument("uid", nargs="?", help="protect, unprotect: the Study Instance UID")
    so.add_argument("--json", action="store_true", help=JSON_HELP)
    so.set_defaults(func=cmd_studies)

    cu = command("cleanup", "run the disk clean-up now: delete least recently used studies that are safe to "
                            "delete, down to the low mark")
    cu.add_argument("--dry-run", action="store_true", help="only list what it would delete, and what it keeps")
    cu.add_argument("--json", action="store_true", help=JSON_HELP)
    cu.set_defaults(func=cmd_cleanup)

    m = command("memory", "the memory server's cache: list it, export an instance, clear it")
    m.add_argument("action", nargs="?", choices=["list", "export", "clear"], default="list",
                   help="list (default), export SOP_INSTANCE_UID FILE, or clear")
    m.add_argument("uid", nargs="?", help="export: the SOP Instance UID")
    m.add_argument("file", nargs="?", help="export: a new file to write the PS3.10 bytes to")
    m.add_argument("--json", action="store_true", help=JSON_HELP)
    m.set_defaults(func=cmd_memory)

    w = command("worklist", "query the modality worklist (MWL C-FIND)")
    w.add_argument("--node", help="the node to ask (role worklist; default the first)")
    w.add_argument("--date", help="today, YYYYMMDD or YYYYMMDD-YYYYMMDD")
    w.add_argument("--patient-name", help="Patient's Name, wildcards * and ?")
    w.add_argument("--patient-id", help="Patient ID")
    w.add_argument("--accession", help="Accession Number")
    w.add_argument("--modality", help="a modality code, or '*' for any")
    w.add_argument("--json", action="store_true", help="items in the DICOM JSON model")
    w.set_defaults(func=cmd_worklist)

    x = command("exam", "exam lifecycle: start, add images, end (MPPS)")
    xsub = x.add_subparsers(dest="action", required=True, metavar="ACTION")
    xs = xsub.add_parser("start", help="start an exam (MPPS IN PROGRESS)")
    xs.add_argument("--item", help="SPS ID of a worklist item of the last query")
    xs.add_argument("--patient-id", help="unscheduled: the Patient ID")
    xs.add_argument("--patient-name", help="unscheduled: the Patient's Name")
    xs.add_argument("--json", action="store_true", help=JSON_HELP)
    xl = xsub.add_parser("list", help="the latest exams with their MPPS state (readable while the service is stopped)")
    xl.add_argument("--json", action="store_true", help=JSON_HELP)
    xw = xsub.add_parser("show", help="one exam: its series and its MPPS messages")
    xw.add_argument("exam_id", type=int, help="the exam")
    xw.add_argument("--json", action="store_true", help=JSON_HELP)
    xa = xsub.add_parser("add", help="add image files to an exam")
    xa.add_argument("exam_id", type=int, help="the exam")
    xa.add_argument("paths", nargs="+", help="PS3.10 files")
    xc = xsub.add_parser("series-complete", help="a series has all its images: apply the auto-send rule 'series'")
    xc.add_argument("exam_id", type=int, help="the exam")
    xc.add_argument("series_uid", help="the Series Instance UID")
    xe = xsub.add_parser("end", help="end an exam (MPPS COMPLETED, or DISCONTINUED)")
    xe.add_argument("exam_id", type=int, help="the exam")
    xe.add_argument("--discontinue", metavar="CODE", help="CID 9300 reason code, e.g. 110513")
    x.set_defaults(func=cmd_exam)
    se = command("send", "send studies to a node (C-STORE), optionally with commitment")
    se.add_argument("study_uids", nargs="+", metavar="STUDY_UID", help="Study Instance UIDs of the archive")
    se.add_argument("--to", required=True, metavar="NODE", help="the node (role store)")
    se.add_argument("--commit", action="store_true", help="ask for Storage Commitment afterwards (role commit)")
    se.add_argument("--wait", action="store_true", help="show progress; exit 0 only on success")
    se.set_defaults(func=cmd_send)

    q = command("query", "browse a remote archive (C-FIND at a node with the qr role)")
    q.add_argument("--from", dest="node", required=True, help="the node to ask")
    q.add_argument("--level", choices=["patient", "study", "series", "image"], default="study",
                   help="the query level (default study)")
    q.add_argument("--model", choices=["study", "patient"], default="study", help="Q/R information model")
    q.add_argument("-k", "--key", action="append", metavar="KEYWORD=VALUE",
                   help="a matching key, e.g. PatientName=DOE* or StudyDate=20240101-; repeatable")
    q.add_argument("--json", action="store_true", help="the matches in the DICOM JSON model")
    q.set_defaults(func=cmd_query)

    rt = command("retrieve", "load a prior study from a node (C-MOVE) into the memory server or the archive")
    rt.add_argument("--from", dest="node", required=True, help="the node to retrieve from (role qr)")
    what = rt.add_mutually_exclusive_group(required=True)
    what.add_argument("--study", help="a Study Instance UID")
    what.add_argument("--patient-id", help="every study of this Patient ID")
    rt.add_argument("--to", choices=["memory", "archive"], default="memory", help="where to (default memory)")
    rt.add_argument("--wait", action="store_true", help="follow the job until it ends")
    rt.set_defaults(func=cmd_retrieve)

    jl = command("jobs", "list the job queue")
    jl.add_argument("--json", action="store_true", help=JSON_HELP)
    jl.set_defaults(func=cmd_jobs)
    jb = command("job", "show, follow, retry or cancel one job")
    jb.add_argument("action", choices=("show", "follow", "retry", "cancel"),
                    help="show (times, attempts), follow (its progress again; Ctrl-C leaves it running), "
                         "retry (a failed or cancelled job again; a queued one now) or cancel")
    jb.add_argument("id", type=int, help="the job's ID (modality-link jobs lists them)")
    jb.add_argument("--json", action="store_true", help=JSON_HELP)
    jb.set_defaults(func=cmd_job)

    b = command("burn", "burn studies to a disc (--drive) or an ISO image file (--iso)")
    b.add_argument("study_uids", nargs="*", metavar="STUDY_UID", help="Study Instance UIDs of the archive")
    b.add_argument("--drive", metavar="DEV", help="/dev/srN, stdio:/path or sim:NAME")
    b.add_argument("--iso", metavar="FILE", help="write ISO image file(s): FILE, FILE_2, ...")
    b.add_argument("--profile", help=f"application profile, PS3.11: {', '.join(sorted(PROFILES))} "
                   "(default media.profile, STD-GEN-CD)")
    b.add_argument("--force", action="store_true", help="with --iso: replace an existing file of that name")
    b.add_argument("--wait", action="store_true", help="follow the burn; exit 0 only if it succeeded")
    b.add_argument("--yes", action="store_true", help="with --wait: do not ask before the next disc")
    b.add_argument("--cancel", type=int, metavar="ID",
                   help="cancel burn ID (same as 'job cancel ID'); a disc being written is finished first")
    b.set_defaults(func=cmd_burn)

    dr = command("drives", "optical drives and their media")
    dr.add_argument("--json", action="store_true", help=JSON_HELP)
    dr.set_defaults(func=cmd_drives)

    cs = command("conformance", "write the DICOM Conformance Statement (PS3.2 Annex A) of this installation's "
                                "configuration")
    cs.add_argument("--format", choices=("md", "html"), default="md", help="Markdown (default) or a standalone "
                                                                          "XHTML page")
    cs.add_argument("--output", "-o", metavar="FILE", help="write to FILE instead of standard output")
    cs.set_defaults(func=cmd_conformance)
    return p


def exit_code(exc: Exception) -> tuple[int, str]:
    """The exit code (:data:`EXIT_CODES`) and the sentence for an error a command raised; the
    one place that decides them. An error of no kind below is re-raised (a bug: a traceback)."""
    if isinstance(exc, NotRunning):
        return EXIT_NOT_RUNNING, str(exc)
    if isinstance(exc, IpcError):
        from modality_link.ipc import CONFIG_INVALID

        unknown_node = isinstance(exc.data, dict) and "node" in exc.data
        return (EXIT_USAGE if unknown_node or exc.code == CONFIG_INVALID else EXIT_FAILED), exc.message
    if isinstance(exc, PermissionError):  # the home is the service's user's (docs/design.md "Files and permissions")
        return EXIT_FAILED, (f"{exc.filename or exc}: permission denied (the service engineer's, or the "
                             f"service's user's)")
    if isinstance(exc, ValueError):
        # modality_link.config (TOML, dataclasses) is loaded only by the commands that use it,
        # so that the thin IPC clients start fast.
        from modality_link.config import ConfigError

        if isinstance(exc, ConfigError):
            return EXIT_USAGE, f"invalid configuration: {exc}"
    raise exc


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(lists="-h" in argv or "--help" in argv).parse_args(argv)
    home = Home.resolve(args.home)
    try:
        return int(args.func(args, home))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        code, message = exit_code(exc)
        print(f"modality-link: {message}", file=sys.stderr)
        return code
