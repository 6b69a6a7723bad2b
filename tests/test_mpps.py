"""MPPS SCP with a pynetdicom SCU against a real `vnpacs serve`: the order follows N-CREATE and N-SET, and every
refusal of PS3.4 F.7.2 comes with its status and leaves the state unchanged."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.conftest import StartServer
from tests.ris_scu import (
    get_order,
    mpps_association,
    mpps_attributes,
    mpps_final,
    mwl_find,
    n_create,
    n_set,
    order_in,
    performed_steps,
    place,
    worklist_identifier,
)
from tests.services import VnpacsService, start_vnpacs
from worklist.models import COMPLETED, DISCONTINUED, IN_PROGRESS, SCHEDULED

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VnpacsService]:
    svc = start_vnpacs({}, tmp_path_factory.mktemp("mpps"))
    try:
        yield svc
    finally:
        svc.stop()


def worklist_item(server: VnpacsService, accession: str) -> Dataset:
    matches, final = mwl_find(server.dicom_port, worklist_identifier(AccessionNumber=accession))
    assert final == 0 and len(matches) == 1
    return matches[0]


def test_worklist_then_mpps_in_progress_then_completed(server: VnpacsService) -> None:
    order = place(server, order_in("MPPS-OK", patient_id="BN-MPPS-1"))
    item = worklist_item(server, "MPPS-OK")  # what the modality read from the worklist
    sps = item.ScheduledProcedureStepSequence[0]
    uid = generate_uid()
    with mpps_association(server.dicom_port) as assoc:
        attrs = mpps_attributes(item.AccessionNumber, item.StudyInstanceUID, sps.ScheduledProcedureStepID)
        assert n_create(assoc, attrs, uid).Status == 0x0000
        started = get_order(server, order.pk)
        assert started.status == IN_PROGRESS
        assert [s.status for s in started.steps] == [IN_PROGRESS]
        assert started.events[-1].source == "mpps" and uid in started.events[-1].detail
        # A step being performed leaves the default worklist.
        gone, _ = mwl_find(server.dicom_port, worklist_identifier(AccessionNumber="MPPS-OK"))
        assert gone == []

        stored = performed_steps(server)[uid]
        assert (stored.status, stored.order_pk, stored.calling_ae) == ("IN PROGRESS", order.pk, "CT01")
        attributes = Dataset.from_json(stored.attributes)
        assert str(attributes.PatientName) == "Nguyễn^Văn An"
        assert attributes.ScheduledStepAttributesSequence[0].AccessionNumber == "MPPS-OK"

        # Still in progress: a partial N-SET is fine and changes nothing for the order.
        partial = Dataset()
        partial.SpecificCharacterSet = "ISO_IR 192"
        partial.PerformedProcedureStepDescription = "CT ngực có tiêm"
        assert n_set(assoc, partial, uid).Status == 0x0000
        assert get_order(server, order.pk).status == IN_PROGRESS

        assert n_set(assoc, mpps_final("COMPLETED", images=[(CT_IMAGE, generate_uid())]), uid).Status == 0x0000
    done = get_order(server, order.pk)
    assert done.status == COMPLETED
    assert [s.status for s in done.steps] == [COMPLETED]
    assert [(e.source, e.to_status) for e in done.events[-2:]] == [("mpps", IN_PROGRESS), ("mpps", COMPLETED)]
    stored = performed_steps(server)[uid]
    assert stored.status == "COMPLETED"
    kept = json.loads(stored.attributes)
    assert kept["00400252"]["Value"] == ["COMPLETED"]
    assert kept["00400254"]["Value"] == ["CT ngực có tiêm"]  # the partial N-SET was kept
    assert len(kept["00400340"]["Value"]) == 1  # PerformedSeriesSequence


def test_discontinued_mpps_discontinues_the_order(server: VnpacsService) -> None:
    order = place(server, order_in("MPPS-DISC", patient_id="BN-MPPS-2"))
    uid = generate_uid()
    with mpps_association(server.dicom_port) as assoc:
        attrs = mpps_attributes("MPPS-DISC", order.study_instance_uid, order.steps[0].sps_id)
        attrs.PerformedProcedureStepDiscontinuationReasonCodeSequence = []
        assert n_create(assoc, attrs, uid).Status == 0
        mods = mpps_final("DISCONTINUED")
        reason = Dataset()
        reason.CodeValue = "110514"
        reason.CodingSchemeDesignator = "DCM"
        reason.CodeMeaning = "Incorrect worklist entry selected"
        mods.PerformedProcedureStepDiscontinuationReasonCodeSequence = [reason]
        assert n_set(assoc, mods, uid).Status == 0
    ended = get_order(server, order.pk)
    assert ended.status == DISCONTINUED
    assert [s.status for s in ended.steps] == [DISCONTINUED]
    assert "Incorrect worklist entry selected" in ended.events[-1].detail


def test_order_found_by_study_instance_uid_when_the_accession_is_empty(server: VnpacsService) -> None:
    order = place(server, order_in("MPPS-BYUID", patient_id="BN-MPPS-3"))
    with mpps_association(server.dicom_port) as assoc:
        assert n_create(assoc, mpps_attributes("", order.study_instance_uid, ""), generate_uid()).Status == 0
    assert get_order(server, order.pk).status == IN_PROGRESS


def test_unscheduled_mpps_is_kept_and_an_unknown_accession_refused(server: VnpacsService) -> None:
    uid = generate_uid()
    with mpps_association(server.dicom_port) as assoc:
        assert n_create(assoc, mpps_attributes("", generate_uid(), ""), uid).Status == 0
        assert n_set(assoc, mpps_final("COMPLETED"), uid).Status == 0
        refused = generate_uid()
        answer = n_create(assoc, mpps_attributes("NO-SUCH-ACC", generate_uid(), "X"), refused)
        assert answer.Status == 0x0106 and "NO-SUCH-ACC" in answer.ErrorComment
    stored = performed_steps(server)
    assert stored[uid].order_pk is None and stored[uid].status == "COMPLETED"
    assert refused not in stored


def test_n_create_refusals(server: VnpacsService) -> None:
    order = place(server, order_in("MPPS-BAD", patient_id="BN-MPPS-4"))
    sps_id = order.steps[0].sps_id

    def attrs() -> Dataset:
        return mpps_attributes("MPPS-BAD", order.study_instance_uid, sps_id)

    missing_type1 = attrs()
    del missing_type1.PerformedStationAETitle
    missing_type2 = attrs()
    del missing_type2.PerformedSeriesSequence
    missing_in_item = attrs()
    del missing_in_item.ScheduledStepAttributesSequence[0].AccessionNumber
    empty_type1 = attrs()
    empty_type1.PerformedProcedureStepStartDate = ""
    not_in_progress = attrs()
    not_in_progress.PerformedProcedureStepStatus = "COMPLETED"
    with mpps_association(server.dicom_port) as assoc:
        for ds, code, words in [
            (missing_type1, 0x0120, "PerformedStationAETitle"),
            (missing_type2, 0x0120, "PerformedSeriesSequence"),
            (missing_in_item, 0x0120, "AccessionNumber"),
            (empty_type1, 0x0121, "PerformedProcedureStepStartDate"),
            (not_in_progress, 0x0106, "IN PROGRESS"),
        ]:
            rsp = n_create(assoc, ds, generate_uid())
            assert rsp.Status == code, (words, hex(rsp.Status))
            assert words in str(rsp.get("ErrorComment", "")), rsp
        assert get_order(server, order.pk).status == SCHEDULED  # nothing was created, the order did not move

        uid = generate_uid()
        assert n_create(assoc, attrs(), uid).Status == 0
        duplicate = n_create(assoc, attrs(), uid)
        assert duplicate.Status == 0x0111
    assert len([u for u in performed_steps(server) if u == uid]) == 1


def test_n_set_refusals(server: VnpacsService) -> None:
    order = place(server, order_in("MPPS-SET", patient_id="BN-MPPS-5"))
    uid = generate_uid()
    with mpps_association(server.dicom_port) as assoc:
        unknown = n_set(assoc, mpps_final("COMPLETED"), generate_uid())
        assert unknown.Status == 0x0112

        assert (
            n_create(assoc, mpps_attributes("MPPS-SET", order.study_instance_uid, order.steps[0].sps_id), uid).Status
            == 0
        )
        not_allowed = Dataset()
        not_allowed.SpecificCharacterSet = "ISO_IR 192"
        not_allowed.PatientName = "Khác^Tên"
        rsp = n_set(assoc, not_allowed, uid)
        assert rsp.Status == 0x0105 and "PatientName" in rsp.ErrorComment

        bad_status = Dataset()
        bad_status.PerformedProcedureStepStatus = "FINISHED"
        assert n_set(assoc, bad_status, uid).Status == 0x0106

        no_series = mpps_final("COMPLETED")
        no_series.PerformedSeriesSequence = []
        rsp = n_set(assoc, no_series, uid)
        assert rsp.Status == 0x0121 and "PerformedSeriesSequence" in rsp.ErrorComment

        no_end = Dataset()
        no_end.PerformedProcedureStepStatus = "COMPLETED"
        assert n_set(assoc, no_end, uid).Status == 0x0121  # end date and time still empty from N-CREATE

        assert performed_steps(server)[uid].status == "IN PROGRESS"
        assert get_order(server, order.pk).status == IN_PROGRESS

        assert n_set(assoc, mpps_final("COMPLETED"), uid).Status == 0
        again = n_set(assoc, mpps_final("DISCONTINUED"), uid)
        assert again.Status == 0x0110
        assert again.ErrorID == 0xA710
        assert again.ErrorComment == "Performed Procedure Step Object may no longer be updated"
    assert performed_steps(server)[uid].status == "COMPLETED"
    assert get_order(server, order.pk).status == COMPLETED


def test_two_step_order_completes_when_both_steps_are_performed(server: VnpacsService) -> None:
    data = order_in("MPPS-TWO", patient_id="BN-MPPS-6")
    second = type(data.steps[0])(modality="CT", station_ae_title="CT02", start_date="20261122", start_time="100000")
    data.steps.append(second)
    order = place(server, data)
    first_sps, second_sps = (s.sps_id for s in order.steps)
    uids = [generate_uid(), generate_uid()]
    with mpps_association(server.dicom_port) as assoc:
        assert n_create(assoc, mpps_attributes("MPPS-TWO", order.study_instance_uid, first_sps), uids[0]).Status == 0
        assert n_set(assoc, mpps_final("COMPLETED"), uids[0]).Status == 0
        halfway = get_order(server, order.pk)
        assert halfway.status == IN_PROGRESS
        assert [s.status for s in halfway.steps] == [COMPLETED, SCHEDULED]
        assert n_create(assoc, mpps_attributes("MPPS-TWO", order.study_instance_uid, second_sps), uids[1]).Status == 0
        assert n_set(assoc, mpps_final("COMPLETED"), uids[1]).Status == 0
    done = get_order(server, order.pk)
    assert done.status == COMPLETED and [s.status for s in done.steps] == [COMPLETED, COMPLETED]


def test_worklist_and_mpps_on_postgresql(start_server: StartServer) -> None:
    server = start_server("fs-pg")
    order = place(server, order_in("MPPS-PG", patient_id="BN-PG", name="Phạm^Thị Ánh"))
    matches, final = mwl_find(server.dicom_port, worklist_identifier(PatientName="pham^thi anh"))
    assert final == 0 and [m.AccessionNumber for m in matches] == ["MPPS-PG"]
    assert str(matches[0].PatientName) == "Phạm^Thị Ánh"
    uid = generate_uid()
    with mpps_association(server.dicom_port) as assoc:
        sps = matches[0].ScheduledProcedureStepSequence[0].ScheduledProcedureStepID
        assert n_create(assoc, mpps_attributes("MPPS-PG", order.study_instance_uid, sps), uid).Status == 0
        assert get_order(server, order.pk).status == IN_PROGRESS
        assert n_set(assoc, mpps_final("COMPLETED"), uid).Status == 0
        assert n_set(assoc, mpps_final("COMPLETED"), uid).Status == 0x0110
        assert n_set(assoc, mpps_final("COMPLETED"), generate_uid()).Status == 0x0112
    assert get_order(server, order.pk).status == COMPLETED
