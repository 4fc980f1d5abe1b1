"""Issue 26: association negotiation's UID checks are memoised without changing their answers,
and each accepted association's copy of the supported contexts shares their UIDs."""

from __future__ import annotations

import copy

import pytest
from pydicom.uid import UID
from pynetdicom import _config as pynetdicom_config
from pynetdicom._validators import validate_ui
from pynetdicom.presentation import PresentationContext

from node.network import uid_checks

TEXTS = [
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.01",  # a leading zero: non-conformant
    "1.2.840..1",
    "1.2.a",
    "",
    "1." + "2" * 62,  # 64 characters: the longest a UID may be
    "1." + "2" * 63,  # 65
]


@pytest.fixture(autouse=True)
def memoised():
    uid_checks.memoise_uid_checks()


def _regex_is_valid(text: str) -> bool:
    import re

    from pydicom.uid import RE_VALID_UID

    return len(text) <= 64 and re.match(RE_VALID_UID, text) is not None


@pytest.mark.parametrize("text", TEXTS)
def test_is_valid_answers_as_pydicom_does(text):
    for _ in range(2):  # computed, then from the cache
        assert UID(text).is_valid is _regex_is_valid(text)


@pytest.mark.parametrize("enforce", [False, True])
@pytest.mark.parametrize("text", TEXTS)
def test_the_validator_answers_as_pynetdicoms_does(text, enforce, monkeypatch):
    monkeypatch.setattr(pynetdicom_config, "ENFORCE_UID_CONFORMANCE", enforce)
    check = pynetdicom_config.VALIDATORS["UI"]
    assert check is not validate_ui
    for _ in range(2):
        assert check(UID(text)) == validate_ui(UID(text))
    assert check(b"1.2") == validate_ui(b"1.2")  # not a str: checked, never kept


@pytest.mark.filterwarnings("ignore:The value length")
def test_long_texts_are_checked_but_not_kept():
    assert UID(TEXTS[0]).is_valid
    pynetdicom_config.VALIDATORS["UI"](UID(TEXTS[0]))
    hostile = "1." + "3" * 5000
    assert UID(hostile).is_valid is False
    assert pynetdicom_config.VALIDATORS["UI"](UID(hostile))[0] is False
    kept_before = _kept()
    assert kept_before >= 2
    for n in range(50):
        assert not UID(f"{hostile}{n}").is_valid
        pynetdicom_config.VALIDATORS["UI"](UID(f"{hostile}{n}"))
    assert _kept() == kept_before


def test_installing_twice_wraps_once():
    check, prop = pynetdicom_config.VALIDATORS["UI"], UID.__dict__["is_valid"]
    uid_checks.memoise_uid_checks()
    assert pynetdicom_config.VALIDATORS["UI"] is check and UID.__dict__["is_valid"] is prop


def _kept() -> int:
    """Entries in both caches (reached through the installed wrappers' closures)."""
    total = 0
    for fn in (pynetdicom_config.VALIDATORS["UI"], UID.__dict__["is_valid"].fget):
        cells = [c.cell_contents for c in fn.__closure__ or ()]
        total += sum(c.cache_info().currsize for c in cells if hasattr(c, "cache_info"))
    return total


@pytest.mark.parametrize("module", ["node.network.scp", "node.network.scu", "node.network.query"])
def test_importing_any_association_module_installs_the_memo_and_the_polling(module):
    """The process-wide changes to pynetdicom (this memo, :mod:`node.network.polling`,
    :mod:`node.network.acceptance`) are in place once any module that makes or accepts an
    association is imported."""
    from .peers import run_python

    probe = (
        f"import {module}; from pynetdicom import _config; from pynetdicom._validators import validate_ui; "
        "from pydicom.uid import UID; "
        "assert _config.VALIDATORS['UI'] is not validate_ui; "
        "assert UID.is_valid.fget.__qualname__.startswith('_memoised'); "
        "import pynetdicom.association as a, pynetdicom.dul as d; from node.network.polling import BackingOffClock; "
        "assert isinstance(a.time, BackingOffClock) and a.time is d.time; "
        "from node.network import acceptance; assert acceptance.installed()"
    )
    run_python(probe)


def test_each_association_gets_its_own_copy_of_the_supported_contexts_with_the_same_uids():
    """pynetdicom deep-copies the server's contexts for every association; the copy shares the
    UIDs (strings) instead of rebuilding them, and is otherwise the association's own."""
    from pynetdicom import AE

    from node.network.scp import VERIFICATION_SOP_CLASS, PeerRule, StorageSCP

    from .peers import free_port

    scp = StorageSCP("AINODE", [PeerRule("ECHOSCU")], lambda instance: None)
    port = free_port()
    scp.start("127.0.0.1", port)
    try:
        contexts = scp._server.contexts  # type: ignore[attr-defined]
        copies = copy.deepcopy(contexts)
        for original, copied in zip(contexts, copies, strict=True):
            assert copied is not original and type(copied) is PresentationContext
            assert copied.transfer_syntax == original.transfer_syntax
            assert copied.transfer_syntax is not original.transfer_syntax  # its own list ...
            assert all(
                a is b for a, b in zip(copied.transfer_syntax, original.transfer_syntax, strict=True)
            )  # same UIDs
            assert copied.abstract_syntax is original.abstract_syntax
        copies[1].transfer_syntax.pop()  # what pynetdicom does to an association's copy stays there
        assert len(contexts[1].transfer_syntax) == len(copies[1].transfer_syntax) + 1
        ae = AE(ae_title="ECHOSCU")
        ae.add_requested_context(VERIFICATION_SOP_CLASS)
        assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        scp.stop()
