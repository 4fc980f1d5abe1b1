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
