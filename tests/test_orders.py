"""The order service every interface goes through, on the real index databases (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pacs.app import migrate_schema
from storage.db import make_engine
from tests.services import index_database
from worklist.identity import IdentifierError, validate_bhyt, validate_cccd
from worklist.orders import OrderConflict, OrderError, OrderIn, Orders, StepIn


@pytest.fixture(params=["sqlite", "pg"])
def orders(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Orders]:
    with index_database(request.param, tmp_path) as url:
        migrate_schema(url)
        engine = make_engine(url)
        try:
            yield Orders(engine)
        finally:
            engine.dispose()


def order(**changes: object) -> OrderIn:
    data = OrderIn(
        patient_id="BN0001",
        patient_name="Nguyễn^Văn An",
        cccd="001085012345",
        bhyt="DN4010123456789",
        patient_birth_date="19850312",
        patient_sex="M",
        placer_order_number="HIS-1",
        procedure_code="CT.NGUC",
        procedure_description="CT ngực không tiêm thuốc",
        steps=[StepIn(modality="CT", station_ae_title="CT01", start_date="20261122", start_time="0900")],
    )
    for key, value in changes.items():
        setattr(data, key, value)
    return data


def test_cccd_and_bhyt_rules() -> None:
    assert validate_cccd("001085012345", birth_date="19850312", sex="M") == "001085012345"
    assert validate_cccd("079301000001", birth_date="20010101", sex="F") == "079301000001"
    for bad, why in [
        ("00108501234", "12 digits"),
        ("00108501234A", "12 digits"),
        ("003085012345", "province"),
        ("001185012345", "sex"),
        ("001084012345", "birth year"),
    ]:
        with pytest.raises(IdentifierError, match=why):
            validate_cccd(bad, birth_date="19850312", sex="M")
    assert validate_bhyt("dn4010123456789") == "DN4010123456789"
    for bad in ["DN401012345678", "D14010123456789", "DN6010123456789", "DN4000123456789"]:
        with pytest.raises(IdentifierError):
            validate_bhyt(bad)


def test_placing_is_idempotent_and_changes_are_recorded(orders: Orders) -> None:
    first, created = orders.place(order(patient_name="Nguye\u0302\u0303n^Văn An"), source="hl7")
    assert created and first.status == "SCHEDULED"
    assert first.patient_name == "Nguyễn^Văn An"  # NFC
    assert len(first.accession_number) <= 16 and first.study_instance_uid
    again, created = orders.place(order(), source="hl7")
    assert not created and again.pk == first.pk and len(again.events) == 1
    changed, _ = orders.place(order(procedure_description="CT ngực có tiêm thuốc"), source="fhir")
    assert changed.procedure_description == "CT ngực có tiêm thuốc"
    assert changed.accession_number == first.accession_number
    assert [e.detail for e in changed.events] == ["order placed", "changed: procedure_description"]
    # Found by accession as well as by placer number.
    by_accession, created = orders.place(
        order(placer_order_number="", accession_number=first.accession_number, patient_name="Nguyễn^Văn Anh"),
        source="api",
    )
    assert not created and by_accession.pk == first.pk and by_accession.patient_name == "Nguyễn^Văn Anh"
    assert [o.pk for o in orders.search(patient_name="nguyen^van")] == [first.pk]
    assert [o.pk for o in orders.search(patient_id="001085012345")] == [first.pk]


def test_invalid_orders_are_refused_and_store_nothing(orders: Orders) -> None:
    for bad, why in [
        (order(cccd="12345"), "CCCD"),
        (order(bhyt="XX"), "BHYT"),
        (order(patient_id=""), "patient ID"),
        (order(steps=[]), "procedure step"),
        (order(patient_birth_date="1985-13-40"), "date"),
        (order(priority="SOON"), "priority"),
        (order(accession_number="A" * 17), "16"),
    ]:
        with pytest.raises(OrderError, match=why):
            orders.place(bad, source="api")
    assert orders.search() == []


def test_lifecycle_moves_forward_and_ends_only_when_allowed(orders: Orders) -> None:
    placed, _ = orders.place(order(), source="hl7")
    orders.advance(placed.pk, "IN_PROGRESS", source="mpps")
    orders.advance(placed.pk, "IMAGES_AVAILABLE", source="ingest")
    same = orders.advance(placed.pk, "IN_PROGRESS", source="mpps")  # late message: no step back
    assert same.status == "IMAGES_AVAILABLE"
    assert [(e.from_status, e.to_status, e.source) for e in same.events] == [
        ("", "SCHEDULED", "hl7"),
        ("SCHEDULED", "IN_PROGRESS", "mpps"),
        ("IN_PROGRESS", "IMAGES_AVAILABLE", "ingest"),
    ]
    with pytest.raises(OrderConflict):
        orders.end(placed.pk, "CANCELLED", source="hl7")
    second, _ = orders.place(order(placer_order_number="HIS-2"), source="hl7")
    ended = orders.end(second.pk, "CANCELLED", source="hl7", reason="bệnh nhân từ chối")
    assert ended.status == "CANCELLED" and all(s.status == "CANCELLED" for s in ended.steps)
    with pytest.raises(OrderConflict):
        orders.place(order(placer_order_number="HIS-2", procedure_description="x"), source="hl7")
