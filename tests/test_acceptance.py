"""Issue 26: an A-ASSOCIATE-RQ seen before is accepted from memory (``node.network.acceptance``)
with exactly pynetdicom's answers, each association gets its own copy, credentials are never kept,
and the peer rules still decide every association."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import PresentationContext, build_context, negotiate_as_acceptor

from node.network import acceptance
from node.network.commitment import STORAGE_COMMITMENT
from node.network.scp import VERIFICATION_SOP_CLASS, PeerRule, StorageSCP

from .peers import CT_SERIES, free_port, run_python, series_files, storescu

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"]


def request(variant: str) -> A_ASSOCIATE:
    """An A-ASSOCIATE-RQ primitive as a sender would make it: ``storescu`` (every storage SOP
    class, three transfer syntaxes each), or with SCP/SCU roles, an asynchronous operations
    window, extended negotiation, an unsupported SOP class or transfer syntax, a user identity."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "STORESCU"
    primitive.called_ae_title = "AINODE"
    contexts = [build_context(cx.abstract_syntax, TRANSFER_SYNTAXES) for cx in StoragePresentationContexts]
    if variant == "unsupported":
        contexts = [build_context("1.2.3.4.5", TRANSFER_SYNTAXES), build_context(CT_IMAGE, ["1.2.3.999"])]
    if variant == "roles":
        contexts.append(build_context(STORAGE_COMMITMENT, ["1.2.840.10008.1.2"]))
    for number, context in enumerate(contexts):
        context.context_id = 2 * number + 1
    primitive.presentation_context_definition_list = contexts
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.276.0.7230010.3.0.3.6.8"
    items: list[Any] = [maximum, implementation]
    if variant == "roles":
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid, role.scu_role, role.scp_role = STORAGE_COMMITMENT, True, True
        items.append(role)
    if variant == "async":
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = window.maximum_number_operations_performed = 4
        items.append(window)
    if variant == "extended":
        extended = SOPClassExtendedNegotiation()
        extended.sop_class_uid, extended.service_class_application_information = CT_IMAGE, b"\x01\x00"
        items.append(extended)
    if variant == "identity":
        identity = UserIdentityNegotiation()
        identity.user_identity_type, identity.primary_field = 2, b"modality"
        identity.secondary_field = b"s3cret-password"
        items.append(identity)
    primitive.user_information = items
    return primitive


VARIANTS = ["storescu", "roles", "async", "extended", "unsupported"]


def shape(primitive: A_ASSOCIATE) -> Any:
    """Everything in a primitive, compared by value."""
    fields = {k: v for k, v in vars(primitive).items() if not isinstance(v, list)}
    lists = {k: [vars(item) for item in v] for k, v in vars(primitive).items() if isinstance(v, list)}
    return fields, lists


def decoded_by_pynetdicom(data: bytes) -> A_ASSOCIATE:
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(data)
    return pdu.to_primitive()


@pytest.fixture
def decoder():
    assoc = Association(AE(ae_title="AINODE"), "acceptor")
    return acceptance.remembering_decoder(assoc.dul)


@pytest.fixture
def supported():
    scp = StorageSCP("AINODE", [PeerRule("STORESCU")], lambda instance: None, on_commitment=lambda *args: None)
    return scp.ae.supported_contexts  # storage commitment with both roles


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_remembered_request_decodes_to_pynetdicoms_primitive(variant, decoder):
    data = A_ASSOCIATE_RQ(request(variant)).encode()
    expected = shape(decoded_by_pynetdicom(data))
    hits = acceptance.REQUESTS.hits
    for _ in range(3):  # decoded, then twice from memory
        pdu, event = decoder(bytearray(data))
        assert event == "Evt6" and type(pdu) is A_ASSOCIATE_RQ and pdu.protocol_version == 1
        assert shape(pdu.to_primitive()) == expected
    assert acceptance.REQUESTS.hits == hits + 2


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_remembered_negotiation_is_pynetdicoms(variant, supported):
    primitive = request(variant)
    roles = {r.sop_class_uid: (r.scu_role, r.scp_role) for r in primitive.user_information if hasattr(r, "scu_role")}
    plain = negotiate_as_acceptor(primitive.presentation_context_definition_list, supported, roles)
    for _ in range(2):
        results, role_items = acceptance.remembered_negotiation(
            primitive.presentation_context_definition_list, supported, roles
        )
        assert [vars(cx) for cx in results] == [vars(cx) for cx in plain[0]]
        assert [vars(r) for r in role_items] == [vars(r) for r in plain[1]]
    accepted = [cx for cx in results if cx.result == 0]
    assert (len(accepted) > 0) is (variant != "unsupported")
    if variant == "roles":
        assert len(role_items) == 1


def accept(variant: str, supported: list[PresentationContext]) -> A_ASSOCIATE:
    """The A-ASSOCIATE (accept) primitive pynetdicom's ACSE builds for ``request(variant)``."""
    rq = request(variant)
    results, role_items = negotiate_as_acceptor(rq.presentation_context_definition_list, supported, {})
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = rq.calling_ae_title, rq.called_ae_title
    primitive.result, primitive.result_source = 0x00, 0x01
    primitive.presentation_context_definition_results_list = results
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 262144
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.3.0.4"
    primitive.user_information = [maximum, implementation, *role_items]
    return primitive


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_remembered_a_associate_ac_is_the_bytes_pynetdicom_encodes(variant, supported):
    primitive = accept(variant, supported)
    expected = A_ASSOCIATE_AC(primitive).encode()
    for _ in range(2):
        pdu = acceptance.remembered_accept(primitive)
        assert type(pdu) is A_ASSOCIATE_AC and pdu.encode() == expected
    # another answer to the same request is encoded, not taken from memory
    primitive.presentation_context_definition_results_list[0].result = 0x03
    primitive.presentation_context_definition_results_list[0].transfer_syntax = ["1.2.840.10008.1.2"]
    assert acceptance.remembered_accept(primitive).encode() == A_ASSOCIATE_AC(primitive).encode() != expected
    primitive.user_information[0].maximum_length_received = 16384
    assert acceptance.remembered_accept(primitive).encode() == A_ASSOCIATE_AC(primitive).encode()


def test_each_association_gets_its_own_copy(decoder, supported):
    data = A_ASSOCIATE_RQ(request("storescu")).encode()
    decoder(bytearray(data))
    first = decoder(bytearray(data))[0].to_primitive()
    expected = copy.deepcopy(shape(first))
    first.presentation_context_definition_list[0].transfer_syntax.pop()  # what one association does ...
    first.presentation_context_definition_list.pop()
    first.user_information[0].maximum_length_received = 1
    assert shape(decoder(bytearray(data))[0].to_primitive()) == expected  # ... stays there
    rq = request("storescu").presentation_context_definition_list
    results, _ = acceptance.remembered_negotiation(rq, supported, {})
    expected_results = copy.deepcopy([vars(cx) for cx in results])
    results[0].transfer_syntax.clear()
    results[1].result = 0x03
    assert [vars(cx) for cx in acceptance.remembered_negotiation(rq, supported, {})[0]] == expected_results


def test_a_request_with_a_user_identity_is_never_remembered(decoder):
    """A password or token in an A-ASSOCIATE-RQ is not kept beyond its association."""
    data = A_ASSOCIATE_RQ(request("identity")).encode()
    assert b"s3cret-password" in data
    for _ in range(2):
        pdu, _ = decoder(bytearray(data))
        assert any(isinstance(i, UserIdentityNegotiation) for i in pdu.to_primitive().user_information)
    assert data not in acceptance.REQUESTS._items
    answer = accept("storescu", [])
    response = UserIdentityNegotiation()
    response.server_response = b"token"
    answer.user_information.append(response)
    before = len(acceptance.ACCEPTS)
    assert acceptance.remembered_accept(answer).encode() == A_ASSOCIATE_AC(answer).encode()
    assert len(acceptance.ACCEPTS) == before


def test_memory_is_bounded_and_forgets_the_least_recently_used():
    remembered: acceptance.Remembered[int, str] = acceptance.Remembered(size=4)
    for n in range(10):
        remembered.put(n, str(n))
    assert len(remembered) == 4 and [remembered.get(n) for n in (5, 6, 9)] == [None, "6", "9"]
    remembered.put(10, "10")  # 7 was used least recently: 6 and 9 were just read
    assert remembered.get(7) is None and remembered.get(6) == "6" and len(remembered) == 4


def test_a_remembered_request_is_still_judged_by_the_peer_rules():
    """DCMTK storescu repeats its A-ASSOCIATE-RQ byte for byte; the repeat is accepted from memory,
    and refused once the peer's rule no longer admits its address (the rule runs every time)."""
    received: list[str] = []
    scp = StorageSCP("AINODE", [PeerRule("STORESCU")], lambda instance: received.append(instance.sop_instance_uid))
    port = free_port()
    scp.start("127.0.0.1", port)
    try:
        files = series_files(CT_SERIES)[:3]
        assert storescu(port, files[:1]).returncode == 0
        hits = acceptance.REQUESTS.hits
        assert storescu(port, files[1:2]).returncode == 0
        assert acceptance.REQUESTS.hits == hits + 1  # the same request, from memory
        scp.set_peers([PeerRule("STORESCU", networks=(ipaddress.ip_network("10.0.0.0/8"),))])
        refused = storescu(port, files[2:3])
        assert refused.returncode != 0 and "Association Rejected" in refused.stdout + refused.stderr
        assert acceptance.REQUESTS.hits == hits + 2
        assert len(received) == 2
        echo = AE(ae_title="STORESCU")
        echo.add_requested_context(VERIFICATION_SOP_CLASS)
        assoc = echo.associate("127.0.0.1", port, ae_title="AINODE")
        assert not assoc.is_established  # pynetdicom's own requestor too
    finally:
        scp.stop()


def test_remembering_is_only_installed_for_the_pynetdicom_it_was_written_for():
    probe = (
        "import pynetdicom; pynetdicom.__version__ = '3.0.5'; "
        "import node.network.association; from node.network import acceptance as a; "
        "from pynetdicom import acse, fsm, pdu; "
        "assert not a.installed() and not a.remember_acceptance(); "
        "assert acse.negotiate_as_acceptor.__module__ == 'pynetdicom.presentation'; "
        "assert fsm.A_ASSOCIATE_AC is pdu.A_ASSOCIATE_AC; "
        "assert pynetdicom._config.LOG_HANDLER_LEVEL == 'none'; "
        "pynetdicom.__version__ = '3.0.4'; assert a.remember_acceptance() and a.installed(); "
        "assert acse.negotiate_as_acceptor is a.remembered_negotiation and fsm.A_ASSOCIATE_AC is a.remembered_accept"
    )
    run_python(probe)


def test_the_keys_hold_every_attribute_of_a_presentation_context(supported):
    """The fast key of a list of contexts is every value of each, in pynetdicom 3.0.4's order: two
    lists that differ in anything have different keys."""
    proposed = request("roles").presentation_context_definition_list
    results, _ = negotiate_as_acceptor(proposed, supported, {})
    for contexts in (proposed, supported, results):
        assert list(acceptance._contexts_key(contexts)) == [
            tuple(v for _name, v in acceptance.frozen(cx)[1:]) for cx in contexts
        ]
    assert tuple(vars(PresentationContext())) == acceptance.CONTEXT_ATTRIBUTES
