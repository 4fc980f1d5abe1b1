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
    ainode store status --config FILE       disk used, reclaimable space, the watermark
    ainode purge STUDY_KEY --config FILE    delete a study's originals, map and results now
    ainode audit show --config FILE         the decrypted audit trail (DICOM audit messages)
    ainode studies list --config FILE       studies in the node and their state
    ainode jobs list|show|retry --config F  jobs, why they ended as they did; replay dead letters
    ainode studies rerun KEY --config F     analyse a study again (superseding its results)
    ainode users add|passwd|role|unlock|remove|list NAME --config F   console users
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from node.cli import admin, models, retrieve
from node.errors import AinodeError

if TYPE_CHECKING:
    from ainode_sdk.registry import Registry
    from node.settings.config import Settings


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
    from node import roles
    from node.health import broker_problem, index_problem, scp_problem
    from node.settings import load_settings

    settings = load_settings(args.config)
    checks = [broker_problem(settings)]
    try:
        index = roles.index_only(settings)
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
    from ainode_sdk.registry import Registry
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
    from node.settings.config import Settings

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
    from ainode_sdk.registry import Registry
    from node.settings import load_settings

    settings = load_settings(config) if config else None
    return Registry(models=settings.models if settings else {}), settings


def cmd_algorithms_list(args: argparse.Namespace) -> int:
    import json as json_

    from ainode_sdk.errors import AlgorithmError
    from ainode_sdk.registry import select_device
    from node.routing.canary import algorithm_roles

    registry, settings = _registry(args.config)
    roles = algorithm_roles(settings) if settings is not None else {}
    for key in registry.names():
        try:
            spec = registry.get(key).spec
        except AlgorithmError:
            continue  # logged by the registry
        accepts = spec.accepts
        declared = registry.declaration(key)
        kind = f"model ({declared.type}, {declared.path})" if declared else "plugin"
        print(
            f"{key}: {spec.name} {spec.version} [{kind}]: {spec.description}\n"
            f"    accepts {'/'.join(accepts.modalities)}, >= {accepts.min_slices} slices"
            + (f", <= {accepts.max_slice_thickness_mm:g} mm" if accepts.max_slice_thickness_mm else "")
            + f"; outputs {', '.join(spec.outputs)}; ~{spec.resources.memory_gib:g} GiB, GPU {spec.resources.gpu}"
        )
        print(f"    used by: {'; '.join(roles.get(key, [])) or 'no route'}")
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
    from node.paths import path_under
    from node.settings import load_settings
    from node.settings.config import Deidentification, EnvKeySource
    from node.storage.keys import load_key_provider
    from node.storage.secrets import PSEUDONYM_SECRET
    from node.uids import check_instance_uids, check_uid

    if args.config:  # the node's own pseudonym secret: same pseudonyms as the running node
        settings = load_settings(args.config)
        profiles = settings.deidentification
        pseudonyms = Pseudonymizer(admin.secrets_of(settings).get(PSEUDONYM_SECRET), PSEUDONYM_SECRET)
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
            check_instance_uids(ds)  # the rule of every way in (PS3.5 9.1): refused files are counted as failed
            deid(ds)
            sop = check_uid(ds.get("SOPInstanceUID"), "SOP Instance UID")
            target = path_under(out, f"{sop}.dcm")
            n = 1
            while target.exists():  # two inputs with one SOP Instance UID: keep both
                n += 1
                target = path_under(out, f"{sop}-{n}.dcm")
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

    p = sub.add_parser("deidentify", help="de-identify DICOM files (PS3.15 Annex E)")
    p.add_argument("paths", nargs="+")
    p.add_argument("--out", required=True, help="folder for the de-identified files")
    p.add_argument("--config", help="take the key and profiles from this configuration")
    p.add_argument("--profile", default="default")
    p.add_argument("--key-env", default="AINODE_KEY", help="without --config: variable holding the master key")
    p.set_defaults(func=cmd_deidentify)

    admin.register(sub)
    models.register(sub)
    retrieve.register(sub)
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
