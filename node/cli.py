"""The ``ainode`` command line.

::

    ainode serve --config FILE              run the node (Storage SCP, scheduler, jobs)
    ainode worker --config FILE [--queues Q,...]  run job stages from Celery (node.executor: celery)
    ainode health --config FILE [--role R]  index, broker and (node) DICOM port answer: for probes
    ainode send PATH... --to HOST:PORT --aet AET   C-STORE files or folders to a peer
    ainode config check FILE                validate a configuration
    ainode config reload --config FILE      validate, then make the running node reload it
    ainode config schema                    JSON Schema of the configuration, for editors
    ainode route test PATH... --config FILE dry run: which route takes each series, and why
    ainode algorithms list [--config F]     registered plugins, declared models, what is loaded
    ainode algorithms check NAME DIR --out D  run one algorithm on a series; validate; SEG/SR; dciodvfy
    ainode keys generate --out FILE         create a master key file (mode 0600)
    ainode keys rotate|retire|status --config FILE  new master key (re-wrap, retire); show key use
    ainode deidentify PATH... --out DIR     de-identify files (PS3.15 Annex E) with a profile
    ainode store verify --config FILE       decrypt every stored object, quarantine tampered ones
    ainode purge STUDY_KEY --config FILE    delete a study's originals, map and results now
    ainode audit show --config FILE         the decrypted audit trail (DICOM audit messages)
    ainode studies list --config FILE       studies in the node and their state
    ainode jobs list|show|retry --config F  jobs, why they ended as they did; replay dead letters
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.errors import AinodeError

if TYPE_CHECKING:
    from algorithms.registry import Registry
    from node.datadir import DataDir
    from node.settings.models import Settings
    from node.storage.index import Index
    from node.storage.secrets import NodeSecrets


def _files(paths: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")))
        else:
            out.append(path)
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    from node import logs
    from node.app import Node
    from node.settings import load_settings

    logs.configure(args.log_level)
    Node(load_settings(args.config), config_path=Path(args.config), log_level=args.log_level).serve_forever()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from node import logs
    from node.app import Worker
    from node.errors import ConfigError
    from node.settings import load_settings

    logs.configure(args.log_level)
    settings = load_settings(args.config)
    if settings.node.executor != "celery":
        raise ConfigError(f"{args.config}: node.executor: is {settings.node.executor!r}; workers need 'celery'")
    queues = [q for q in (args.queues or "").split(",") if q] or settings.celery.queues()
    Worker(settings, queues, args.concurrency, Path(args.config)).serve_forever()
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from node.health import broker_problem, index_problem, scp_problem
    from node.settings import load_settings
    from node.storage.index import Index

    settings = load_settings(args.config)
    checks = [broker_problem(settings)]
    try:
        index = Index.for_data_dir(settings.node.data_dir, 5.0, settings.storage.database_url)
    except AinodeError as exc:  # unreachable, or a schema this release does not know
        checks.append(f"index: {exc}")
    else:
        checks.append(index_problem(index))
        index.engine.dispose()
    if args.role == "node":
        checks.append(scp_problem(settings.node))
    problems = [p for p in checks if p]
    for problem in problems:
        print(f"unhealthy: {problem}", file=sys.stderr)
    if not problems:
        print(f"healthy ({args.role})")
    return 1 if problems else 0


def cmd_send(args: argparse.Namespace) -> int:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from node.network.scu import send_datasets

    host, _, port = args.to.rpartition(":")
    if not host or not port.isdigit():
        raise AinodeError(f"--to {args.to!r}: expected HOST:PORT")
    datasets, skipped, paths = [], 0, {}
    for path in _files(args.paths):
        try:
            datasets.append(ds := dcmread(path))
            paths[str(ds.get("SOPInstanceUID", ""))] = path
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            skipped += 1
            print(f"{path}: skipped, not readable as DICOM: {exc}", file=sys.stderr)
    if not datasets:
        raise AinodeError("nothing to send")
    outcome = send_datasets(datasets, host, int(port), calling_ae_title=args.calling_aet, called_ae_title=args.aet)
    failed = outcome.failed
    for uid in failed:
        print(f"{paths.get(uid, uid)}: not sent: {outcome.reasons.get(uid, 'failed')}", file=sys.stderr)
    print(f"sent {len(datasets) - len(failed)} of {len(datasets)} instance(s); {len(failed)} failed; {skipped} skipped")
    return 1 if failed else 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from algorithms.registry import Registry
    from node.app import check_algorithms
    from node.settings import load_settings

    settings = load_settings(args.file)
    check_algorithms(settings, Registry(), args.file)
    print(f"{args.file}: OK ({len(settings.peers)} peer(s), {len(settings.routes)} route(s))")
    return 0


def cmd_config_reload(args: argparse.Namespace) -> int:
    import os
    import signal

    from node.settings import load_settings

    settings = load_settings(args.config)  # refuse here, with the error, before bothering the node
    cmd_config_check(argparse.Namespace(file=args.config))
    pid_file = settings.node.data_dir / "ainode.pid"
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        raise AinodeError(f"no running node found through {pid_file}: {exc}") from None
    print(f"reload requested from node pid {pid}; its log and audit trail record the outcome")
    return 0


def cmd_config_schema(_args: argparse.Namespace) -> int:
    from node.settings.models import Settings

    print(json.dumps(Settings.model_json_schema(), indent=2))
    return 0


def cmd_route_test(args: argparse.Namespace) -> int:
    from node.routing.dryrun import dry_run
    from node.settings import load_settings

    settings = load_settings(args.config)
    calling = args.calling_aet or (settings.peers[0].ae_title if settings.peers else "UNKNOWN")
    print(dry_run(settings, [Path(p) for p in args.paths], calling, show_values=args.show_values))
    return 0


def _registry(config: str | None) -> tuple[Registry, Settings | None]:
    from algorithms.registry import Registry
    from node.settings import load_settings

    settings = load_settings(config) if config else None
    return Registry(models=settings.models if settings else {}), settings


def cmd_algorithms_list(args: argparse.Namespace) -> int:
    import json as json_

    from algorithms.registry import select_device

    registry, settings = _registry(args.config)
    for spec in registry.specs():
        accepts = spec.accepts
        declared = registry.declaration(spec.name)
        kind = f"model ({declared.type}, {declared.path})" if declared else "plugin"
        print(
            f"{spec.name} {spec.version} [{kind}]: {spec.description}\n"
            f"    accepts {'/'.join(accepts.modalities)}, >= {accepts.min_slices} slices"
            + (f", <= {accepts.max_slice_thickness_mm:g} mm" if accepts.max_slice_thickness_mm else "")
            + f"; outputs {', '.join(spec.outputs)}; ~{spec.resources.memory_gib:g} GiB, GPU {spec.resources.gpu}"
        )
    if settings is not None:
        for status in sorted((settings.node.data_dir / "run").glob("models-*.json")):
            held = json_.loads(status.read_text())
            for name, model in held["models"].items():
                print(
                    f"loaded: {name} on {held['device']} (worker pid {held['pid']}): "
                    f"{model['memory_bytes'] / 2**20:.1f} MiB of weights, loaded {model['loads']} time(s)"
                )
    print(f"device: {select_device()}")
    return 0


def cmd_algorithms_check(args: argparse.Namespace) -> int:
    from node.jobs.check import check_algorithm

    registry, _settings = _registry(args.config)
    report = check_algorithm(registry, args.name, Path(args.series), Path(args.out))
    for note in report.notes:
        print(note)
    for path in report.written:
        print(f"wrote {path}")
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    print(f"{args.name}: {'PASS' if report.passed else 'FAIL'}")
    return 0 if report.passed else 1


def cmd_deidentify(args: argparse.Namespace) -> int:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from node.deid import InstanceDeidentifier
    from node.deid.pseudonyms import Pseudonymizer
    from node.errors import QuarantinedError
    from node.settings import load_settings
    from node.settings.models import Deidentification, EnvKeySource
    from node.storage.keys import load_key_provider
    from node.storage.secrets import PSEUDONYM_SECRET

    if args.config:  # the node's own pseudonym secret: same pseudonyms as the running node
        settings = load_settings(args.config)
        profiles = settings.deidentification
        pseudonyms = Pseudonymizer(_secrets(settings).get(PSEUDONYM_SECRET), PSEUDONYM_SECRET)
    else:  # stand-alone: a pseudonym key derived from the master key in the environment
        profiles = {"default": Deidentification()}
        key = load_key_provider(EnvKeySource(provider="env", variable=args.key_env)).current()
        pseudonyms = Pseudonymizer(key.derive("pseudonym"), key.key_id)
    if args.profile not in profiles:
        raise AinodeError(f"no de-identification profile {args.profile!r}")
    deid = InstanceDeidentifier(pseudonyms, profiles[args.profile])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = quarantined = failed = skipped = 0
    for path in _files(args.paths):
        try:
            ds = dcmread(path)
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            skipped += 1
            print(f"{path}: skipped, not readable as DICOM: {exc}", file=sys.stderr)
            continue
        try:
            deid(ds)
            target = out / f"{ds.SOPInstanceUID}.dcm"
            n = 1
            while target.exists():  # two inputs with one SOP Instance UID: keep both
                n += 1
                target = out / f"{ds.SOPInstanceUID}-{n}.dcm"
            if n > 1:
                print(f"{path}: duplicate SOP Instance UID, written as {target.name}", file=sys.stderr)
            ds.save_as(target, enforce_file_format=True)
            written += 1
        except QuarantinedError as exc:
            quarantined += 1
            print(f"{path}: {exc}", file=sys.stderr)
        except AinodeError as exc:
            failed += 1
            print(f"{path}: not de-identified: {exc}", file=sys.stderr)
        except (OSError, EOFError, ValueError, AttributeError) as exc:  # pydicom's own word on the file
            failed += 1
            print(f"{path}: not de-identified: {type(exc).__name__}: {exc}", file=sys.stderr)
    print(f"de-identified {written}, quarantined {quarantined}, failed {failed}, skipped {skipped} (not DICOM)")
    return 1 if failed else 0


def _open(config: str) -> DataDir:
    """The data directory an admin command works on, opened as every process of the node opens it
    (store with the disk watermark, index, secrets, audit log with its ATNA mirror)."""
    from node.datadir import open_data_dir
    from node.settings import load_settings

    return open_data_dir(load_settings(config), role="cli")


def _index_engine(config: str) -> Any:
    """The engine of the configured index, without opening (and checking) it as an Index."""
    from sqlalchemy import create_engine

    from node.settings import load_settings
    from node.storage.index import default_url

    settings = load_settings(config)
    settings.node.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return create_engine(settings.storage.database_url or default_url(settings.node.data_dir))


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


def _secrets(settings: Settings) -> NodeSecrets:
    from node.datadir import open_data_dir

    return open_data_dir(settings, role="cli").secrets


def _rotate(args: argparse.Namespace, add_key: bool) -> int:
    from node.audit import SECURITY_CONFIGURATION, security_alert
    from node.datadir import rotate_keys
    from node.settings.models import FileKeySource

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
    from collections import Counter

    store = _open(args.config).store
    counts = Counter(store.key_id_of(o) for o in store.object_ids())
    current = store.keys.current().key_id
    for key_id in store.keys.key_ids():
        print(f"{key_id}  {'current' if key_id == current else 'old    '}  {counts.pop(key_id, 0)} object(s)")
    for key_id, n in counts.items():
        print(f"{key_id}  MISSING  {n} object(s) cannot be opened")
    quarantined = len(list((store.root / "quarantine").iterdir()))
    print(f"quarantined objects: {quarantined}")
    return 1 if counts else 0


def cmd_store_verify(args: argparse.Namespace) -> int:
    from node.audit import OBJECT_SECURITY_ATTRIBUTES_CHANGED, security_alert
    from node.errors import StorageError, TamperedObjectError

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
    print(f"{ok} object(s) intact, {tampered} tampered or unreadable")
    return 1 if tampered else 0


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


def cmd_studies_list(args: argparse.Namespace) -> int:
    for study in _index(args.config).studies():
        print(f"{study.study_key}  {study.state:<10} {study.instance_count:>5} instance(s)  {study.reason or ''}")
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
    print(json.dumps(info, indent=2))
    return 0


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    import time

    from node.storage.index import JobState, StudyState

    index = _index(args.config)
    job = index.job(args.id)
    if job is None:
        raise AinodeError(f"no job {args.id}")
    if job.state not in (JobState.FAILED, JobState.PENDING):
        raise AinodeError(f"job {args.id} is {job.state}; only failed (dead-letter) or waiting jobs are retried")
    index.update_job(args.id, state=JobState.PENDING, attempts=0, next_attempt_at=time.time(), reason="retry requested")
    index.set_study_state(job.study_key, StudyState.PROCESSING)
    print(f"job {args.id} queued again; a running node picks it up within a second")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ainode``."""
    parser = argparse.ArgumentParser(prog="ainode", description="DICOM node that brings AI results into the PACS")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the node")
    p.add_argument("--config", required=True)
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run job stages that Celery brings (node.executor: celery)")
    p.add_argument("--config", required=True)
    p.add_argument("--queues", help="comma-separated queues to consume (default: every queue of the configuration)")
    p.add_argument("--concurrency", type=int, default=1, help="jobs run at once (threads)")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("health", help="check the index, the broker and (node) the DICOM port; exit 1 if not")
    p.add_argument("--config", required=True)
    p.add_argument("--role", choices=["node", "worker"], default="node")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("send", help="C-STORE files or folders to a peer")
    p.add_argument("paths", nargs="+")
    p.add_argument("--to", required=True, help="HOST:PORT of the peer")
    p.add_argument("--aet", required=True, help="called AE title (the peer's)")
    p.add_argument("--calling-aet", default="AINODE-SCU", help="our AE title")
    p.set_defaults(func=cmd_send)

    config = sub.add_parser("config", help="configuration").add_subparsers(dest="action", required=True)
    p = config.add_parser("check", help="validate a configuration file")
    p.add_argument("file")
    p.set_defaults(func=cmd_config_check)

    p = config.add_parser("reload", help="validate, then make the running node reload (SIGHUP)")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_config_reload)
    config.add_parser("schema", help="print the JSON Schema of the configuration").set_defaults(func=cmd_config_schema)

    route = sub.add_parser("route", help="routing rules").add_subparsers(dest="action", required=True)
    p = route.add_parser("test", help="dry run: explain which route takes each series (no network)")
    p.add_argument("paths", nargs="+", help="files, folders or a DICOMDIR")
    p.add_argument("--config", required=True)
    p.add_argument("--calling-aet", help="AE title the study would come from (default: the first peer)")
    p.add_argument("--show-values", action="store_true", help="also print the attribute values (may be PHI)")
    p.set_defaults(func=cmd_route_test)

    algorithms = sub.add_parser("algorithms", help="analysis plugins").add_subparsers(dest="action", required=True)
    p = algorithms.add_parser("list", help="registered plugins and declared models (and which are loaded)")
    p.add_argument("--config", help="also the models this configuration declares, and what its node holds")
    p.set_defaults(func=cmd_algorithms_list)
    p = algorithms.add_parser("check", help="run one algorithm on a series, validate it, write SEG/SR, dciodvfy")
    p.add_argument("name")
    p.add_argument("series", help="folder of the series' DICOM files")
    p.add_argument("--out", required=True, help="folder for the SEG and SR")
    p.add_argument("--config", help="the configuration declaring the model")
    p.set_defaults(func=cmd_algorithms_check)

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

    p = sub.add_parser("deidentify", help="de-identify DICOM files (PS3.15 Annex E)")
    p.add_argument("paths", nargs="+")
    p.add_argument("--out", required=True, help="folder for the de-identified files")
    p.add_argument("--config", help="take the key and profiles from this configuration")
    p.add_argument("--profile", default="default")
    p.add_argument("--key-env", default="AINODE_KEY", help="without --config: variable holding the master key")
    p.set_defaults(func=cmd_deidentify)

    store = sub.add_parser("store", help="the encrypted store").add_subparsers(dest="action", required=True)
    p = store.add_parser("verify", help="decrypt every object; quarantine tampered ones")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_store_verify)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ainode`` console script."""
    args = build_parser().parse_args(argv)
    from node.dicomio import configure_pydicom

    configure_pydicom()
    try:
        return int(args.func(args))
    except AinodeError as exc:
        print(f"ainode: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
