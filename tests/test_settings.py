"""Configuration validation: each broken file gives one precise error naming file, line and key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from node.errors import ConfigError
from node.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]

VALID = """\
node:
  ae_title: AINODE
  port: 11112
keys:
  provider: env
peers:
  - ae_title: PACS
    port: 4242
destinations:
  pacs: {type: dicom, peer: PACS}
routes:
  - name: lung
    match:
      Modality: CT
    algorithms: [lung-ct-density]
    destinations: [pacs]
"""


def test_example_config_is_valid():
    settings = load_settings(ROOT / "config" / "ainode.example.yaml")
    assert [a.name for a in settings.routes[0].algorithms] == ["lung-ct-density"]


def test_valid_minimal(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(VALID)
    assert load_settings(path).peer("PACS").port == 4242


BROKEN = [
    # (replace this, with this, expected line, expected text)
    ("  port: 11112", "  port: 99999", 3, "node.port: Input should be less than or equal to 65535"),
    ("  ae_title: AINODE", "  ae_title: THIS-TITLE-IS-TOO-LONG", 2, "node.ae_title: String should have at most 16"),
    ("  provider: env", "  provider: vault", 4, "keys: Input tag 'vault' found using 'provider' does not match"),
    (
        "      Modality: CT",
        "      Modality: {equals: CT}",
        14,
        "routes[0].match.Modality: unknown operator 'equals'; did you mean 'eq'?",
    ),
    ("      Modality: CT", "      Modalty: CT", 14, "routes[0].match.Modalty: 'Modalty' is not a DICOM keyword"),
    (
        "    destinations: [pacs]",
        "    destinations: [archive]",
        16,
        "routes[0].destinations: 'archive' is not a configured destination",
    ),
    (
        "  pacs: {type: dicom, peer: PACS}",
        "  pacs: {type: dicom, peer: OTHER}",
        10,
        "destinations.pacs.peer: 'OTHER' is not in peers",
    ),
    ("    port: 4242", "    port: 4242\n    colour: blue", 9, "peers[0].colour: unknown key 'colour'"),
    ("  - name: lung", "  - name: lung ct", 12, "routes[0].name: String should match pattern"),
    ("node:", "node:\n  data_dir: [1, 2]", 2, "node.data_dir: Input is not a valid path"),
    (
        "  pacs: {type: dicom, peer: PACS}",
        "  pacs: {type: dicom, peer: PACS, objects: [SR], sr: segment}",
        10,
        "destinations.pacs: sr: segment references the SEG's segments, so objects must include SEG",
    ),
    (
        "    destinations: [pacs]",
        "    destinations: [pacs]\nstorage:\n  database_url: postgresql+psycopg://ainode:secret@db/ainode",
        17,
        "storage: database_url: holds a password",
    ),
    (
        "  pacs: {type: dicom, peer: PACS}",
        "  pacs: {type: dicom, peer: PACS, objects: [SEG, PDF]}",
        10,
        "destinations.pacs.objects[1]: Input should be 'SEG', 'SR', 'GSPS' or 'SC'",
    ),
]


@pytest.mark.parametrize(("old", "new", "line", "text"), BROKEN)
def test_broken_config_names_line_and_key(tmp_path, old, new, line, text):
    assert old in VALID
    path = tmp_path / "broken.yaml"
    path.write_text(VALID.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert text in message


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent("node:\n  port: [1, 2\nkeys: {}\n"))
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_settings(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.yaml")


def test_the_readmes_model_declarations_are_accepted_as_written(tmp_path):
    """Issue 22, defect 11: SNOMED CT codes are numbers, and YAML reads them as integers."""
    import re

    import yaml

    from ainode_sdk.declared.spec import LabelSpec

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if b.startswith("models:")]
    assert blocks, "the README declares models"
    declared = yaml.safe_load(blocks[0])["models"]
    labels = [spec for model in declared.values() for spec in (model.get("labels") or {}).values()]
    assert any(isinstance(spec["type"][0], int) for spec in labels), "the README writes codes as YAML integers"
    for spec in labels:
        assert LabelSpec.model_validate(spec).codes()["type"] == ("78961009", "SCT", "Spleen")
    declaration = {**declared["spleen-onnx"], "path": str(tmp_path / "spleen.onnx")}
    declaration.pop("sha256")
    import onnx
    from onnx import TensorProto, helper

    shape = [1, 1, 96, 96, 96]
    graph = helper.make_graph(
        [helper.make_node("Concat", ["x", "x"], ["y"], axis=1)], "two-channels",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 96, 96, 96])],
    )  # fmt: skip
    onnx.save(helper.make_model(graph), str(tmp_path / "spleen.onnx"))
    config = tmp_path / "ainode.yaml"
    config.write_text(
        textwrap.dedent(
            """\
            keys: {provider: env, variable: AINODE_TEST_KEY}
            """
        )
        + yaml.safe_dump({"models": {"spleen-onnx": declaration}})
    )
    settings = load_settings(config)
    assert settings.models["spleen-onnx"].labels[1].type == ["78961009", "SCT", "Spleen"]
