"""Issue 24 (canary): ``canary: {algorithm, share}`` on a route's algorithm sends that share of the
route's studies to the new version, chosen by a keyed hash of the study key — the same studies
after a restart and on every worker; each job records the algorithm that served it."""

from __future__ import annotations

import hashlib
import io
import secrets

import pydicom
import pytest

from ainode_sdk.registry import Registry
from node.app import check_algorithms
from node.errors import ConfigError
from node.instances import ReceivedInstance
from node.jobs.pipeline import Pipeline, Services
from node.routing.canary import CANARY_SECRET, canary_point, serving
from node.settings.config import Settings
from node.storage.index import Index
from node.storage.ingest import Ingest
from node.storage.keys import KeyringProvider
from node.storage.secrets import NodeSecrets
from node.storage.store import ObjectStore

from .peers import CT_SERIES, series_files

ROUTE = {
    "name": "lung", "match": {"Modality": "CT"}, "completion": {"quiet_period_s": 1},
    "algorithms": [{"name": "lung-ct-density", "canary": {"algorithm": "lung-unet", "share": 0.25}}],
}  # fmt: skip


def _node(tmp_path, key: bytes) -> tuple[Pipeline, Index, ObjectStore]:
    settings = Settings.model_validate({"node": {"data_dir": str(tmp_path)}, "keys": {"provider": "env"},
                                        "peers": [{"ae_title": "STORESCU"}], "routes": [ROUTE]})  # fmt: skip
    store = ObjectStore(tmp_path / "store", KeyringProvider([key]))
    index = Index.for_data_dir(tmp_path)
    services = Services(settings, store, index, NodeSecrets(store), Registry(), "cpu", clock=lambda: 2e9)
    return Pipeline(services), index, store


def test_a_quarter_of_forty_studies_go_to_the_canary_the_same_after_a_restart(tmp_path):
    key = secrets.token_bytes(32)
    pipeline, index, store = _node(tmp_path, key)
    # fixed node secrets and UIDs: which of 40 studies fall in a share of 0.25 is binomial, and
    # random ones would land outside 5..15 in about 4 % of runs
    for name in ("index", CANARY_SECRET):
        store.put(hashlib.sha256(f"ainode canary test {name}".encode()).digest(), object_id=f"secret-{name}")
    ingest = Ingest(store, index, NodeSecrets(store))
    template = pydicom.dcmread(series_files(CT_SERIES)[0])
    for n in range(40):  # 40 distinct studies of one instance each
        root = f"1.2.826.0.1.3680043.10.1111.24.{n + 1}"
        template.StudyInstanceUID, template.SeriesInstanceUID = root, f"{root}.1"
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = f"{root}.1.1"
        buffer = io.BytesIO()
        template.save_as(buffer)
        ingest(ReceivedInstance(str(template.StudyInstanceUID), str(template.SeriesInstanceUID),
                                str(template.SOPInstanceUID), str(template.SOPClassUID), "1.2.840.10008.1.2.1",
                                "STORESCU", buffer.getvalue()))  # fmt: skip
    ingest.close()
    studies = [s.study_key for s in index.studies()]
    assert len(studies) == 40
    served = {}
    for study_key in studies:
        (job_id,) = pipeline.plan(study_key)
        served[study_key] = index.job(job_id).algorithm  # the job records which version served it
    canary = {k for k, algorithm in served.items() if algorithm == "lung-unet"}
    print(f"canary share 0.25 over 40 studies: {len(canary)} served by the new version")
    assert 5 <= len(canary) <= 15
    assert set(served.values()) == {"lung-ct-density", "lung-unet"}

    # a restarted node, or another worker: a new process over the same data directory
    again, _index, _store = _node(tmp_path, key)
    canary_key = again.s.secrets.get(CANARY_SECRET)
    ref = again.s.settings.routes[0].algorithms[0]
    assert {k for k in studies if serving(canary_key, k, "lung", ref) == "lung-unet"} == canary


def test_the_choice_is_keyed_and_uniform():
    key, other = secrets.token_bytes(32), secrets.token_bytes(32)
    points = [canary_point(key, f"{n:032x}", "lung", "x") for n in range(2000)]
    assert 0.2 < sum(p < 0.25 for p in points) / 2000 < 0.3
    assert points != [canary_point(other, f"{n:032x}", "lung", "x") for n in range(2000)]  # another node's key


def test_a_canary_naming_an_unknown_algorithm_is_refused():
    settings = Settings.model_validate({"keys": {"provider": "env"}, "routes": [{
        **ROUTE, "algorithms": [{"name": "lung-ct-density", "canary": {"algorithm": "no-such", "share": 0.1}}],
    }]})  # fmt: skip
    with pytest.raises(ConfigError, match=r"routes\[0\]\.algorithms\[0\]\.canary: no algorithm named 'no-such'"):
        check_algorithms(settings, Registry(), "x.yaml")


def test_algorithms_list_shows_how_routes_use_each_version(tmp_path):
    import subprocess

    import yaml

    from .peers import AINODE, ROOT

    config = yaml.safe_load((ROOT / "config" / "lung-unet.example.yaml").read_text())
    config["routes"] = [
        {
            "name": "lung",
            "match": {"Modality": "CT"},
            "algorithms": [{"name": "lung-unet", "canary": {"algorithm": "lung-unet-ts", "share": 0.25}}],
        }
    ]
    path = tmp_path / "ainode.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**__import__("os").environ, "AINODE_KEY": "unused"}
    listed = subprocess.run([AINODE, "algorithms", "list", "--config", str(path)], capture_output=True, text=True,
                            cwd=ROOT, env=env, check=False)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert "used by: route lung: live" in listed.stdout
    assert "used by: route lung: canary 25 % (of lung-unet)" in listed.stdout
    assert "lung-ct-density 1.0.0 [plugin]" in listed.stdout and "used by: no route" in listed.stdout


def test_two_versions_of_one_model_side_by_side(tmp_path):
    """``name`` and ``version``: two declarations of one model; the list shows each version and
    how the routes use it (live, shadow)."""
    import os
    import subprocess

    import yaml

    from .peers import AINODE, ROOT

    config = yaml.safe_load((ROOT / "config" / "lung-unet.example.yaml").read_text())
    config["models"]["lung-unet-v2"] = {**config["models"]["lung-unet"], "name": "lung-unet", "version": "5"}
    config["routes"] = [{"name": "lung", "match": {"Modality": "CT"}, "algorithms": ["lung-unet"],
                         "shadow": [{"algorithm": "lung-unet-v2"}]}]  # fmt: skip
    path = tmp_path / "ainode.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = Settings.model_validate(config)
    registry = Registry(models=settings.models)
    one, two = registry.get("lung-unet").spec, registry.get("lung-unet-v2").spec
    assert (one.name, one.version, two.name, two.version) == ("lung-unet", "4e64091", "lung-unet", "5")
    assert one.weights_sha256 == two.weights_sha256
    listed = subprocess.run([AINODE, "algorithms", "list", "--config", str(path)], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "AINODE_KEY": "unused"}, check=False)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert "lung-unet-v2: lung-unet 5 [model (onnx" in listed.stdout
    assert "used by: route lung: shadow (against lung-unet)" in listed.stdout


def test_a_shadow_must_name_a_live_algorithm_to_be_compared_with():
    route = {**ROUTE, "shadow": [{"algorithm": "lung-unet-ts", "against": "no-such"}]}
    with pytest.raises(ValueError, match=r"shadow\[0\]\.against: 'no-such' is not a live algorithm of this route"):
        Settings.model_validate({"keys": {"provider": "env"}, "routes": [route]})
    route = {**ROUTE, "shadow": [{"algorithm": "lung-ct-density"}]}
    with pytest.raises(ValueError, match=r"shadow\[0\]\.algorithm: 'lung-ct-density' already serves this route"):
        Settings.model_validate({"keys": {"provider": "env"}, "routes": [route]})
