"""Orders in over JSON REST and FHIR R4 against the running server: round trips, searches, bad input, auth."""

from __future__ import annotations

import copy
import time
from typing import Any

import httpx
import jwt
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.servicerequest import ServiceRequest

from tests.conftest import StartServer
from tests.mllp import ack_code, order, pid, send
from tests.services import VnpacsService

V2 = "http://terminology.hl7.org/CodeSystem/v2-0203"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
FHIR = {"Content-Type": "application/fhir+json"}


def rest_order(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "patient_id": "BN-REST-1",
        "issuer_of_patient_id": "BVBM",
        "patient_name": "Nguyễn^Thị Mai",
        "cccd": "001185012345",
        "bhyt": "HC4010123456789",
        "patient_birth_date": "19850312",
        "patient_sex": "F",
        "placer_order_number": "REST-1",
        "episode_id": "LK-REST-1",
        "procedure_code": "XQ.NGUC",
        "procedure_description": "X-quang ngực thẳng",
        "referring_physician_name": "Trần^Văn Bình",
        "steps": [{"modality": "DX", "station_ae_title": "DX01", "start_date": "2026-11-22", "start_time": "0800"}],
    }
    body.update(changes)
    return body


def api(server: VnpacsService, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, f"{server.base_url}{path}", timeout=30, **kw)


def count(server: VnpacsService) -> int:
    return len(api(server, "GET", "/api/orders", params={"limit": 1000}).json())


# ---- REST ---------------------------------------------------------------------------------------------------------


def test_rest_place_update_read_search(embedded: VnpacsService) -> None:
    created = api(embedded, "POST", "/api/orders", json=rest_order())
    assert created.status_code == 201, created.text
    o = created.json()
    assert created.headers["location"] == f"/api/orders/{o['id']}"
    assert (o["status"], o["patient_name"], o["cccd"], o["steps"][0]["start_date"]) == (
        "SCHEDULED",
        "Nguyễn^Thị Mai",
        "001185012345",
        "20261122",
    )
    again = api(embedded, "POST", "/api/orders", json=rest_order())
    assert again.status_code == 200 and again.json()["id"] == o["id"] and len(again.json()["history"]) == 1
    changed = api(embedded, "POST", "/api/orders", json=rest_order(procedure_description="X-quang ngực nghiêng"))
    assert changed.status_code == 200
    assert changed.json()["history"][-1]["source"] == "api"
    assert "procedure_description" in changed.json()["history"][-1]["detail"]
    # Fields left out keep their value; the steps sent replace the steps, keeping what they leave out.
    partial = {"patient_id": "BN-REST-1", "patient_name": "Nguyễn^Thị Mai", "placer_order_number": "REST-1"}
    kept = api(embedded, "POST", "/api/orders", json={**partial, "steps": [{"modality": "DX", "start_time": "0900"}]})
    assert kept.status_code == 200 and kept.json()["id"] == o["id"]
    assert (kept.json()["cccd"], kept.json()["episode_id"]) == ("001185012345", "LK-REST-1")
    assert [(s["station_ae_title"], s["start_date"], s["start_time"]) for s in kept.json()["steps"]] == [
        ("DX01", "20261122", "0900")
    ]
    read = api(embedded, "GET", f"/api/orders/{o['id']}")
    assert read.status_code == 200 and read.json()["procedure_description"] == "X-quang ngực nghiêng"
    assert api(embedded, "GET", "/api/orders/999999").status_code == 404
    for params in (
        {"accession": o["accession_number"]},
        {"patient_id": "001185012345"},  # CCCD finds the patient too
        {"patient_name": "nguyen^thi mai"},
        {"status": "SCHEDULED", "patient_id": "BN-REST-1"},
    ):
        found = api(embedded, "GET", "/api/orders", params=params).json()
        assert [x["id"] for x in found] == [o["id"]], params
    assert api(embedded, "GET", "/api/orders", params={"status": "CANCELLED", "patient_id": "BN-REST-1"}).json() == []
    bad_status = api(embedded, "GET", "/api/orders", params={"status": "DONE"})
    assert bad_status.status_code == 400 and "unknown status" in bad_status.json()["detail"]


def test_rest_refuses_invalid_orders_and_keeps_state(embedded: VnpacsService) -> None:
    before = count(embedded)
    for body, status, why in [
        (rest_order(placer_order_number="REST-BAD", cccd="12345"), 422, "CCCD"),
        (rest_order(placer_order_number="REST-BAD", bhyt="XX"), 422, "BHYT"),
        (rest_order(placer_order_number="REST-BAD", patient_birth_date="1985-13-40"), 422, "date"),
        (rest_order(placer_order_number="REST-BAD", steps=[]), 422, "steps"),
        (rest_order(placer_order_number="REST-BAD", colour="blue"), 422, "colour"),
        ({"patient_name": "Ai"}, 422, "patient_id"),
    ]:
        response = api(embedded, "POST", "/api/orders", json=body)
        assert response.status_code == status, (body, response.text)
        assert why in response.text
    not_json = api(embedded, "POST", "/api/orders", content=b"{not json", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 422
    assert count(embedded) == before


def test_rest_cancel_and_conflicts(embedded: VnpacsService) -> None:
    o = api(embedded, "POST", "/api/orders", json=rest_order(placer_order_number="REST-CA")).json()
    cancelled = api(embedded, "POST", f"/api/orders/{o['id']}/cancel", json={"reason": "Bệnh nhân chuyển viện"})
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "CANCELLED"
    assert cancelled.json()["history"][-1]["detail"] == "Bệnh nhân chuyển viện"
    assert api(embedded, "POST", f"/api/orders/{o['id']}/cancel").status_code == 200  # again: nothing changes
    change = api(
        embedded, "POST", "/api/orders", json=rest_order(placer_order_number="REST-CA", procedure_code="XQ.KHAC")
    )
    assert change.status_code == 409 and "CANCELLED" in change.json()["detail"]
    assert api(embedded, "POST", "/api/orders/999999/cancel").status_code == 404
    # Found by its accession number, an order can be changed without its placer number.
    by_accession = rest_order(placer_order_number="", accession_number=o["accession_number"])
    assert api(embedded, "POST", "/api/orders", json=by_accession).status_code == 409


# ---- FHIR ---------------------------------------------------------------------------------------------------------


def service_request(**changes: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "contained": [
            {
                "resourceType": "Patient",
                "id": "p1",
                "identifier": [
                    {
                        "type": {"coding": [{"system": V2, "code": "PI"}]},
                        "value": "BN-FHIR-1",
                        "assigner": {"display": "BVBM"},
                    },
                    {"type": {"coding": [{"system": V2, "code": "NI"}]}, "value": "079301000001"},
                    {"type": {"coding": [{"system": V2, "code": "SB"}]}, "value": "DN4790123456789"},
                ],
                "name": [{"use": "official", "family": "Võ", "given": ["Thị", "Hồng"]}],
                "gender": "female",
                "birthDate": "2001-01-01",
            }
        ],
        "identifier": [{"type": {"coding": [{"system": V2, "code": "PLAC"}]}, "value": "FHIR-1"}],
        "status": "active",
        "intent": "order",
        "priority": "urgent",
        "code": {
            "coding": [{"system": "urn:oid:1.2.704.0.1", "code": "MR.SO", "display": "MRI sọ não"}],
            "text": "MRI sọ não không tiêm",
        },
        "orderDetail": [{"coding": [{"system": DCM, "code": "MR"}]}],
        "subject": {"reference": "#p1"},
        "encounter": {"identifier": {"value": "LK-FHIR-1"}},
        "occurrenceDateTime": "2026-11-23T10:15:00+07:00",
        "requester": {"display": "Đỗ^Văn Hải"},
        "reasonCode": [{"text": "Đau đầu kéo dài"}],
    }
    resource.update(changes)
    return resource


def identifier(resource: dict[str, Any], code: str) -> str:
    for ident in resource.get("identifier", []):
        if ident.get("type", {}).get("coding", [{}])[0].get("code") == code:
            return str(ident["value"])
    raise KeyError(code)


def test_fhir_create_read_search_update_revoke(embedded: VnpacsService) -> None:
    created = api(embedded, "POST", "/fhir/ServiceRequest", json=service_request(), headers=FHIR)
    assert created.status_code == 201, created.text
    assert created.headers["content-type"].startswith("application/fhir+json")
    sr = created.json()
    ServiceRequest.model_validate(sr)
    assert created.headers["location"].endswith(f"/fhir/ServiceRequest/{sr['id']}")
    assert (sr["status"], sr["intent"], sr["priority"]) == ("active", "order", "urgent")
    assert identifier(sr, "PLAC") == "FHIR-1"
    accession = identifier(sr, "ACSN")
    patient = sr["contained"][0]
    assert {identifier(patient, c) for c in ("PI", "NI", "SB")} == {"BN-FHIR-1", "079301000001", "DN4790123456789"}
    assert patient["name"][0]["family"] == "Võ" and patient["name"][0]["given"] == ["Thị", "Hồng"]
    assert sr["occurrenceDateTime"] == "2026-11-23T10:15:00+07:00"
    # The same order, seen through REST.
    [o] = api(embedded, "GET", "/api/orders", params={"accession": accession}).json()
    assert (o["patient_name"], o["patient_sex"], o["patient_birth_date"]) == ("Võ^Thị Hồng", "F", "20010101")
    assert (o["priority"], o["episode_id"], o["procedure_code"]) == ("HIGH", "LK-FHIR-1", "MR.SO")
    assert (o["procedure_description"], o["reason_for_study"]) == ("MRI sọ não không tiêm", "Đau đầu kéo dài")
    assert [(s["modality"], s["start_date"], s["start_time"]) for s in o["steps"]] == [("MR", "20261123", "101500")]
    # POSTed again: the same order (200), nothing new in its history.
    again = api(embedded, "POST", "/fhir/ServiceRequest", json=service_request(), headers=FHIR)
    assert again.status_code == 200 and again.json()["id"] == sr["id"]
    assert len(api(embedded, "GET", f"/api/orders/{sr['id']}").json()["history"]) == 1
    read = api(embedded, "GET", f"/fhir/ServiceRequest/{sr['id']}")
    assert read.status_code == 200 and identifier(read.json(), "ACSN") == accession
    for params in (
        {"identifier": f"{V2}|FHIR-1"},
        {"identifier": accession},
        {"subject:Patient.identifier": "079301000001"},
        {"subject:Patient.identifier": "BVBM|BN-FHIR-1", "status": "active"},
    ):
        bundle = api(embedded, "GET", "/fhir/ServiceRequest", params=params)
        assert bundle.status_code == 200 and bundle.headers["content-type"].startswith("application/fhir+json")
        Bundle.model_validate(bundle.json())
        assert bundle.json()["type"] == "searchset" and bundle.json()["total"] == 1, params
        assert bundle.json()["entry"][0]["resource"]["id"] == sr["id"]
    assert api(embedded, "GET", "/fhir/ServiceRequest", params={"identifier": "NOPE"}).json()["total"] == 0
    revoked_search = {"subject:Patient.identifier": "BN-FHIR-1", "status": "revoked"}
    assert api(embedded, "GET", "/fhir/ServiceRequest", params=revoked_search).json()["total"] == 0
    # PUT a change, then revoke.
    put = api(
        embedded,
        "PUT",
        f"/fhir/ServiceRequest/{sr['id']}",
        json=service_request(id=sr["id"], orderDetail=[{"coding": [{"system": DCM, "code": "CT"}]}]),
        headers=FHIR,
    )
    assert put.status_code == 200, put.text
    assert put.json()["orderDetail"][0]["coding"][0]["code"] == "CT"
    revoke = api(
        embedded, "PUT", f"/fhir/ServiceRequest/{sr['id']}", json=service_request(status="revoked"), headers=FHIR
    )
    assert revoke.status_code == 200 and revoke.json()["status"] == "revoked"
    assert api(embedded, "GET", f"/api/orders/{sr['id']}").json()["status"] == "CANCELLED"
    assert api(embedded, "GET", "/fhir/ServiceRequest", params=revoked_search).json()["total"] == 1
    changed_after = api(embedded, "POST", "/fhir/ServiceRequest", json=service_request(), headers=FHIR)
    assert changed_after.status_code == 409
    OperationOutcome.model_validate(changed_after.json())


def test_fhir_patient_referenced_by_identifier(embedded: VnpacsService) -> None:
    # A patient the RIS knows from an HL7 order.
    hl7_order = order("ORM^O01", "MSG-FHIR-REF", "NW", "HIS-FHIR-REF", pid("BN-FHIR-REF", "Đinh^Công Tráng"))
    assert ack_code(send(embedded.hl7_port, hl7_order)) == "AA"
    by_reference = service_request(
        contained=None,
        subject={"identifier": {"type": {"coding": [{"system": V2, "code": "PI"}]}, "value": "BN-FHIR-REF"}},
        identifier=[{"type": {"coding": [{"system": V2, "code": "PLAC"}]}, "value": "FHIR-REF-1"}],
    )
    del by_reference["contained"]
    created = api(embedded, "POST", "/fhir/ServiceRequest", json=by_reference, headers=FHIR)
    assert created.status_code == 201, created.text
    [o] = api(embedded, "GET", "/api/orders", params={"accession": identifier(created.json(), "ACSN")}).json()
    assert (o["patient_name"], o["cccd"]) == ("Đinh^Công Tráng", "001085012345")
    unknown = copy.deepcopy(by_reference)
    unknown["subject"]["identifier"]["value"] = "BN-NOBODY"
    unknown["identifier"][0]["value"] = "FHIR-REF-2"
    refused = api(embedded, "POST", "/fhir/ServiceRequest", json=unknown, headers=FHIR)
    assert refused.status_code == 422 and "not known" in refused.text
    # An HL7 order read as FHIR.
    [hl7_placed] = api(embedded, "GET", "/api/orders", params={"patient_id": "BN-FHIR-REF", "limit": 1000}).json()[-1:]
    read = api(embedded, "GET", f"/fhir/ServiceRequest/{hl7_placed['id']}").json()
    assert ServiceRequest.model_validate(read).status == "active"


def test_fhir_bad_input_is_an_operation_outcome_and_changes_nothing(embedded: VnpacsService) -> None:
    before = count(embedded)

    def bad(**changes: Any) -> dict[str, Any]:  # an order the RIS does not have
        return service_request(**{"identifier": [plac("FHIR-BAD")], **changes})

    patient = service_request()["contained"][0]
    bad_cccd = copy.deepcopy(patient)
    bad_cccd["identifier"][1]["value"] = "079101000001"  # sex digit says male
    no_pi = copy.deepcopy(patient)
    no_pi["identifier"] = no_pi["identifier"][1:]
    cases: list[tuple[bytes | dict[str, Any], int, str]] = [
        (b"{not json", 400, "not JSON"),
        ({"resourceType": "Patient", "id": "x"}, 400, "expected a ServiceRequest"),
        (bad(status=42), 400, "status"),
        (bad(colour="blue"), 400, "colour"),
        (bad(occurrenceDateTime="tomorrow"), 400, "occurrenceDateTime"),
        (bad(contained=[bad_cccd]), 422, "CCCD"),
        (bad(contained=[no_pi]), 422, "PI"),
        (bad(orderDetail=[]), 422, "modality"),
        (bad(intent="proposal"), 422, "intent"),
        (bad(status="draft"), 422, "draft"),
        (bad(identifier=[]), 422, "PLAC"),
        (bad(subject={"reference": "Patient/123"}), 422, "contained"),
        (
            bad(status="revoked", identifier=[{"value": "x", "type": {"coding": [{"code": "PLAC"}]}}]),
            422,
            "no order",
        ),
    ]
    for body, status, why in cases:
        kw: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
        response = api(embedded, "POST", "/fhir/ServiceRequest", headers=FHIR, **kw)
        assert response.status_code == status, (body, response.text)
        assert response.headers["content-type"].startswith("application/fhir+json")
        oo = response.json()
        OperationOutcome.model_validate(oo)
        assert oo["issue"][0]["severity"] == "error" and why in oo["issue"][0]["diagnostics"], oo
    wrong_type = api(embedded, "POST", "/fhir/ServiceRequest", content=b"<xml/>", headers={"Content-Type": "text/xml"})
    assert wrong_type.status_code == 415
    assert api(embedded, "GET", "/fhir/ServiceRequest/999999").status_code == 404
    assert api(embedded, "PUT", "/fhir/ServiceRequest/999999", json=service_request(), headers=FHIR).status_code == 404
    assert api(embedded, "GET", "/fhir/ServiceRequest", params={"status": "finished"}).status_code == 400
    assert count(embedded) == before
    # A PUT whose body names another order is a conflict, and changes neither.
    first = api(embedded, "POST", "/fhir/ServiceRequest", json=service_request(identifier=[plac("FHIR-C1")])).json()
    second = api(embedded, "POST", "/fhir/ServiceRequest", json=service_request(identifier=[plac("FHIR-C2")])).json()
    clash = api(
        embedded,
        "PUT",
        f"/fhir/ServiceRequest/{second['id']}",
        json=service_request(identifier=[plac("FHIR-C1")], priority="stat"),
        headers=FHIR,
    )
    assert clash.status_code == 409
    assert api(embedded, "GET", f"/api/orders/{first['id']}").json()["priority"] == "HIGH"
    mismatch = api(embedded, "PUT", f"/fhir/ServiceRequest/{second['id']}", json=service_request(id="1"), headers=FHIR)
    assert mismatch.status_code == 400


def plac(value: str) -> dict[str, Any]:
    return {"type": {"coding": [{"system": V2, "code": "PLAC"}]}, "value": value}


def test_orders_and_fhir_need_a_token_in_token_mode(start_server: StartServer) -> None:
    secret = "bi-mat-cua-benh-vien-dai-hon-32-byte"
    server = start_server("fs-sqlite", VNPACS_AUTH="token", VNPACS_JWT_SECRET=secret)
    token = jwt.encode({"sub": "his", "exp": int(time.time()) + 300}, secret, algorithm="HS256")
    for method, path, kw in [
        ("GET", "/api/orders", {}),
        ("POST", "/api/orders", {"json": rest_order()}),
        ("GET", "/fhir/ServiceRequest", {}),
        ("POST", "/fhir/ServiceRequest", {"json": service_request()}),
    ]:
        assert api(server, method, path, **kw).status_code == 401, path
    bearer = {"Authorization": f"Bearer {token}"}
    assert api(server, "POST", "/api/orders", json=rest_order(), headers=bearer).status_code == 201
    assert api(server, "GET", "/fhir/ServiceRequest", headers=bearer).json()["total"] == 1
