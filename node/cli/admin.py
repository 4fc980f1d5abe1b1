"""``ainode`` commands that administer a node's data directory: the index schema, keys, the
store, purges, the audit trail, studies, jobs and console users. Each opens the data directory
as every process of the node does (:func:`node.datadir.open_data_dir`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.errors import AinodeError, NotFoundError

if TYPE_CHECKING:
    from node.datadir import DataDir
    from node.settings.config import Settings
    from node.storage.index import Index, StudyRow
    from node.storage.secrets import NodeSecrets


def _open(config: str) -> DataDir:
    """The data directory an admin command works on (:func:`node.roles.cli_data`)."""
    from node import roles

    return roles.cli_data(config)


def _index_engine(config: str) -> Any:
    """The engine of the configured index, without opening (and checking) it as an Index."""
    from node import roles
    from node.settings import load_settings

    return roles.index_engine(load_settings(config))


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from node.storage import schema

    engine = _index_engine(args.config)
    before = schema.upgrade(engine)
    after = schema.state(engine).current
    shown = {None: "empty", "legacy": "from before migrations"}.get(before.current, f"at {before.current}")
    print(f"index {engine.url.render_as_string(hide_password=True)}: was {shown}, now at {after}")
    return 0


def cmd_db_status(args: argparse.Namespace) -> int:
    from node.storage import schema

    engine = _index_engine(args.config)
    now = schema.state(engine)
    print(f"index {engine.url.render_as_string(hide_password=True)}: revision {now.current}, this release {now.head}")
    return 0 if now.current == now.head else 1


def secrets_of(settings: Settings) -> NodeSecrets:
    from node import roles

    return roles.cli_data(settings).secrets


def _rotate(args: argparse.Namespace, add_key: bool) -> int:
    from node.audit import SECURITY_CONFIGURATION, security_alert
    from node.datadir import rotate_keys
    from node.settings.config import FileKeySource

    data = _open(args.config)
    if add_key and not isinstance(data.settings.keys, FileKeySource):
        print(f"keys come from ${data.settings.keys.variable}: put the new key first there and restart; re-wrapping")
    done = rotate_keys(data, add_key=add_key, wait_s=args.wait)
    for reason in done.tampered:
        print(f"tampered, quarantined: {reason}", file=sys.stderr)
    for key_id, why in done.kept.items():
        print(f"key {key_id} kept: {why}")
    print(
        f"current key {done.current}: {done.rewrapped} object(s) re-wrapped, {len(done.tampered)} quarantined;", end=" "
    )
    print(f"retired {len(done.retired)} key(s)")
    what = "rotated to" if add_key else "re-wrapped to"
    data.audit.record(
        security_alert(SECURITY_CONFIGURATION, f"master key {what} {done.current}; {len(done.retired)} retired")
    )
    if data.mirror is not None:
        data.mirror.flush()
    return 1 if done.tampered else 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    return _rotate(args, add_key=True)


def cmd_keys_retire(args: argparse.Namespace) -> int:
    return _rotate(args, add_key=False)


def cmd_keys_status(args: argparse.Namespace) -> int:
    store = _open(args.config).store
    counts = store.objects_per_key()
    current = store.keys.current().key_id
    for key_id in store.keys.key_ids():
        print(f"{key_id}  {'current' if key_id == current else 'old    '}  {counts.pop(key_id, 0)} object(s)")
    for key_id, n in counts.items():
        print(f"{key_id}  MISSING  {n} object(s) cannot be opened")
    quarantined = len(list((store.root / "quarantine").iterdir()))
    print(f"quarantined objects: {quarantined}")
    return 1 if counts else 0


def cmd_store_status(args: argparse.Namespace) -> int:
    import shutil

    from node.storage import segments

    data = _open(args.config)
    space = segments.space(data.store.segments_root)
    usage = shutil.disk_usage(data.store.root)
    watermark = data.settings.node.min_free_disk_mb * 2**20
    print(f"segments: {space.segments}, {space.allocated / 1e6:.1f} MB on disk, {space.live / 1e6:.1f} MB live")
    print(f"reclaimable: {space.reclaimable / 1e6:.1f} MB (deleted records the file system still holds)")
    state = "receiving" if usage.free >= watermark else "refusing new instances (0xA700)"
    print(f"disk: {usage.free / 1e6:.1f} MB free of {usage.total / 1e6:.1f} MB, watermark "
          f"{watermark / 1e6:.1f} MB: {state}")  # fmt: skip
    print(f"quarantined objects: {len(list((data.store.root / 'quarantine').iterdir()))}")
    return 0


def cmd_store_verify(args: argparse.Namespace) -> int:
    from node.audit import OBJECT_SECURITY_ATTRIBUTES_CHANGED, security_alert
    from node.errors import StorageError, TamperedObjectError
    from node.storage.damage import damaged_instances, set_aside

    data = _open(args.config)
    store, audit = data.store, data.audit
    ok = tampered = 0
    for object_id in store.object_ids():
        try:
            store.get(object_id)
            ok += 1
        except TamperedObjectError as exc:
            tampered += 1
            print(f"tampered, quarantined: {exc}", file=sys.stderr)
            audit.record(security_alert(OBJECT_SECURITY_ATTRIBUTES_CHANGED, f"tamper detected: {exc}"))
        except StorageError as exc:
            tampered += 1
            print(f"unreadable: {exc}", file=sys.stderr)
    damaged = damaged_instances(data.index, store)
    for damage in damaged:
        print(f"damaged or missing: {damage}", file=sys.stderr)
        if args.repair:
            set_aside(data.index, store, damage,
                      lambda text: audit.record(security_alert(OBJECT_SECURITY_ATTRIBUTES_CHANGED, text)))  # fmt: skip
        else:
            audit.record(security_alert(OBJECT_SECURITY_ATTRIBUTES_CHANGED, f"damaged stored instance: {damage}"))
    print(f"{ok} object(s) intact, {tampered} tampered or unreadable, {len(damaged)} indexed instance(s) "
          f"damaged or missing{' (set aside)' if args.repair and damaged else ''}")  # fmt: skip
    return 1 if tampered or damaged else 0


def cmd_purge(args: argparse.Namespace) -> int:
    from node.jobs.retention import purge_study

    data = _open(args.config)
    n = purge_study(data.index, data.store, args.study_key, data.audit, "purged by an administrator")
    if n == 0:
        raise AinodeError(f"no study {args.study_key} (see 'ainode studies list')")
    print(f"purged study {args.study_key}: {n} object(s) deleted")
    return 0


def cmd_audit_show(args: argparse.Namespace) -> int:
    for record in _open(args.config).audit.read():
        print(record)
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from node.storage.keys import generate_key_file

    print(f"wrote key {generate_key_file(Path(args.out))} to {args.out}")
    return 0


def _index(config: str) -> Index:
    return _open(config).index


def study_line(study: StudyRow) -> str:
    """One study as ``ainode studies list`` prints it: key, state, instances, reason."""
    return f"{study.study_key}  {study.state:<10} {study.instance_count:>5} instance(s)  {study.reason or ''}"


def cmd_studies_list(args: argparse.Namespace) -> int:
    for study in _index(args.config).studies():
        print(study_line(study))
    return 0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    for job in _index(args.config).jobs(state=args.state):
        print(f"{job.id:>6}  {job.state:<9} {job.algorithm:<20} study {job.study_key}  {job.reason or ''}")
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    job = _index(args.config).job(args.id)
    if job is None:
        raise AinodeError(f"no job {args.id}")
    fields = (
        "id", "study_key", "route", "algorithm", "state", "stage", "attempts", "next_attempt_at", "reason",
        "worker", "lease_expires_at", "config_digest", "created_at", "updated_at",
    )  # fmt: skip
    info = {f: getattr(job, f) for f in fields} | {"timings": json.loads(job.timings), "results": job.result_ids}
    record = _index(args.config).model_record(job.id)
    if record is not None:  # what its model saw and said, and a shadow's comparison
        info["model"] = {"name": record.model, "version": record.version, "role": record.role,
                         "outcome": record.outcome, "inputs": json.loads(record.inputs),
                         "outputs": json.loads(record.outputs),
                         "comparison": json.loads(record.comparison) if record.comparison else None}  # fmt: skip
    print(json.dumps(info, indent=2))
    return 0


def cmd_studies_rerun(args: argparse.Namespace) -> int:
    from node.audit import APPLICATION_ACTIVITY, AuditEvent, study_key_object
    from node.jobs.admin import rerun_study

    data = _open(args.config)
    generation = rerun_study(data.index, args.study_key)
    text = f"study {args.study_key} re-run (generation {generation}) from the command line"
    data.audit.record(
        AuditEvent(APPLICATION_ACTIVITY, "U", description=text, objects=[study_key_object(args.study_key)])
    )
    print(f"study {args.study_key} will be analysed again (generation {generation}) by the running node")
    return 0


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    from node.jobs.admin import retry_job

    retry_job(_index(args.config), args.id)
    print(f"job {args.id} queued again; a running node picks it up within a second")
    return 0


def _password(args: argparse.Namespace) -> str:
    """The new password: from standard input with ``--password-stdin``, else asked twice."""
    import getpass

    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise AinodeError("the passwords differ")
    return first


def _user_audit(data: DataDir, text: str) -> None:
    from node.audit import SECURITY_CONFIGURATION, security_alert

    data.audit.record(security_alert(SECURITY_CONFIGURATION, text))


def cmd_users_add(args: argparse.Namespace) -> int:
    from node.console.auth import check_user_name, hash_password
    from node.storage.tables import Role

    check_user_name(args.name)
    data = _open(args.config)
    data.index.add_user(args.name, Role(args.role), hash_password(_password(args)))
    _user_audit(data, f"console user {args.name} added ({args.role})")
    print(f"console user {args.name} added with role {args.role}")
    return 0


def cmd_users_passwd(args: argparse.Namespace) -> int:
    from node.console.auth import hash_password

    data = _open(args.config)
    if not data.index.update_user(args.name, password_hash=hash_password(_password(args)), failed_logins=0,
                                  locked_until=None):  # fmt: skip
        raise NotFoundError(f"no console user {args.name}")
    _user_audit(data, f"console user {args.name}: password changed, sessions ended")
    print(f"password of {args.name} changed; their sessions ended")
    return 0


def cmd_users_role(args: argparse.Namespace) -> int:
    data = _open(args.config)
    if not data.index.update_user(args.name, role=args.role):
        raise NotFoundError(f"no console user {args.name}")
    _user_audit(data, f"console user {args.name}: role {args.role}, sessions ended")
    print(f"{args.name} is now {args.role}; their sessions ended")
    return 0


def cmd_users_unlock(args: argparse.Namespace) -> int:
    data = _open(args.config)
    if not data.index.update_user(args.name, failed_logins=0, locked_until=None):
        raise NotFoundError(f"no console user {args.name}")
    _user_audit(data, f"console user {args.name} unlocked")
    print(f"{args.name} unlocked")
    return 0


def cmd_users_remove(args: argparse.Namespace) -> int:
    data = _open(args.config)
    if not data.index.remove_user(args.name):
        raise NotFoundError(f"no console user {args.name}")
    _user_audit(data, f"console user {args.name} removed")
    print(f"console user {args.name} removed")
    return 0


def cmd_users_list(args: argparse.Namespace) -> int:
    import time

    now = time.time()
    for user in _index(args.config).users():
        kind = "local" if user.password_hash else "single sign-on"
        locked = (
            f"  locked for {user.locked_until - now:.0f} s" if user.locked_until and user.locked_until > now else ""
        )
        print(f"{user.name:<24} {user.role:<9} {kind}{locked}")
    return 0


def register(sub: Any) -> None:
    """Add the administration commands to the ``ainode`` parser's sub-commands."""
    db = sub.add_parser("db", help="the index database").add_subparsers(dest="action", required=True)
    p = db.add_parser("upgrade", help="migrate the index schema to this release (Alembic), in place")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_db_upgrade)
    p = db.add_parser("status", help="the index's schema revision and this release's (exit 1 if they differ)")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_db_status)

    keys = sub.add_parser("keys", help="master keys").add_subparsers(dest="action", required=True)
    p = keys.add_parser("generate", help="write a new master key file")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_keys_generate)
    p = keys.add_parser("rotate", help="add a new current key, re-wrap every object, retire unused keys")
    p.add_argument("--config", required=True)
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for running processes to take the key")
    p.set_defaults(func=cmd_keys_rotate)
    p = keys.add_parser("retire", help="re-wrap every object to the current key, retire the keys nothing uses")
    p.add_argument("--config", required=True)
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for running processes to take the key")
    p.set_defaults(func=cmd_keys_retire)
    p = keys.add_parser("status", help="keys in the keyring and the objects each one wraps")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_keys_status)

    store = sub.add_parser("store", help="the encrypted store").add_subparsers(dest="action", required=True)
    p = store.add_parser("verify", help="decrypt every object; quarantine tampered ones")
    p.add_argument("--config", required=True)
    p.add_argument(
        "--repair",
        action="store_true",
        help="quarantine damaged or missing instances and forget them (their studies are analysed without)",
    )
    p.set_defaults(func=cmd_store_verify)
    p = store.add_parser("status", help="disk used by the store, reclaimable space, the watermark")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_store_status)

    p = sub.add_parser("purge", help="delete everything held for a study now")
    p.add_argument("study_key", help="the study key shown by 'ainode studies list'")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_purge)

    audit = sub.add_parser("audit", help="the audit trail").add_subparsers(dest="action", required=True)
    p = audit.add_parser("show", help="decrypt and print the audit records (PS3.15 A.5 XML)")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_audit_show)

    studies = sub.add_parser("studies", help="studies in the node").add_subparsers(dest="action", required=True)
    p = studies.add_parser("list")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_studies_list)
    p = studies.add_parser("rerun", help="analyse a study again (its new results supersede the old ones)")
    p.add_argument("study_key", help="the study key shown by 'ainode studies list'")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_studies_rerun)

    jobs = sub.add_parser("jobs", help="analysis jobs").add_subparsers(dest="action", required=True)
    p = jobs.add_parser("list")
    p.add_argument("--config", required=True)
    p.add_argument(
        "--state", choices=["pending", "running", "delivered", "refused", "quarantined", "failed", "superseded"]
    )
    p.set_defaults(func=cmd_jobs_list)
    p = jobs.add_parser("retry", help="queue a failed (dead-letter) job again")
    p.add_argument("id", type=int)
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_jobs_retry)
    p = jobs.add_parser("show")
    p.add_argument("id", type=int)
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_jobs_show)

    users = sub.add_parser("users", help="console users").add_subparsers(dest="action", required=True)
    for name, func, helptext in (
        ("add", cmd_users_add, "create a user (asks for the password; no default exists)"),
        ("passwd", cmd_users_passwd, "set a user's password (ends their sessions, unlocks)"),
        ("role", cmd_users_role, "change a user's role (ends their sessions)"),
        ("unlock", cmd_users_unlock, "lift a lock-out after repeated failed logins"),
        ("remove", cmd_users_remove, "delete a user and end their sessions"),
    ):
        p = users.add_parser(name, help=helptext)
        p.add_argument("name")
        p.add_argument("--config", required=True)
        if name in ("add", "role"):
            p.add_argument("--role", required=True, choices=["admin", "operator", "viewer"])
        if name in ("add", "passwd"):
            p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
        p.set_defaults(func=func)
    p = users.add_parser("list", help="users, roles and lock-outs")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_users_list)
