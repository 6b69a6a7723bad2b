"""Patient identity changes from the HIS carried to the index: demographics updates (ADT^A08) and merges (ADT^A40).

The stored objects are not rewritten (they stay byte-exact as received); the index, which every query answers from,
follows the HIS. Attribute corrections that rewrite objects are a separate, audited operation.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, Engine, delete, insert, select, update

from storage.models import Patient, PatientIdentifier, Study
from storage.text import nfc, search_key


def _patient_pks(conn: Connection, patient_id: str, issuer: str) -> list[int]:
    """Index rows for a patient: exact issuer first; rows stored without an issuer match any issuer."""
    rows = list(
        conn.execute(
            select(Patient.pk).where(Patient.patient_id == patient_id, Patient.issuer_of_patient_id == issuer)
        ).scalars()
    )
    if not rows and issuer:
        rows = list(
            conn.execute(
                select(Patient.pk).where(Patient.patient_id == patient_id, Patient.issuer_of_patient_id == "")
            ).scalars()
        )
    return rows


def update_patient(
    engine: Engine,
    patient_id: str,
    issuer: str = "",
    *,
    name: str | None = None,
    birth_date: str | None = None,
    sex: str | None = None,
    identifiers: Sequence[tuple[str, str, str]] | None = None,
) -> int:
    """Set the given demographics on the patient's index rows; `identifiers` are (value, issuer, type) added as
    Other Patient IDs. Returns the number of patient rows changed (0 when no study of that patient is stored)."""
    values: dict[str, str] = {}
    if name is not None:
        values["patient_name"] = nfc(name)
        values["patient_name_key"] = search_key(nfc(name))
    if birth_date is not None:
        values["patient_birth_date"] = birth_date
    if sex is not None:
        values["patient_sex"] = sex
    with engine.begin() as conn:
        pks = _patient_pks(conn, patient_id, issuer)
        for pk in pks:
            if values:
                conn.execute(update(Patient).where(Patient.pk == pk).values(**values))
            for value, id_issuer, type_of_id in identifiers or ():
                known = conn.execute(
                    select(PatientIdentifier.pk).where(
                        PatientIdentifier.patient_pk == pk,
                        PatientIdentifier.value == value,
                        PatientIdentifier.issuer == id_issuer,
                    )
                ).first()
                if known is None:
                    conn.execute(
                        insert(PatientIdentifier).values(
                            patient_pk=pk, value=value, issuer=id_issuer, type_of_patient_id=type_of_id
                        )
                    )
            if identifiers:
                all_ids = conn.execute(
                    select(PatientIdentifier.value).where(PatientIdentifier.patient_pk == pk)
                ).scalars()
                conn.execute(
                    update(Patient).where(Patient.pk == pk).values(other_patient_ids="\\".join(dict.fromkeys(all_ids)))
                )
        return len(pks)


def merge_patients(engine: Engine, *, survivor: tuple[str, str], merged: tuple[str, str]) -> int:
    """Move every study of `merged` (PatientID, issuer) to `survivor`, then drop the merged patient's rows.

    When the survivor has no stored study yet, the merged patient's row is renamed instead. Returns the number of
    studies that now belong to the survivor because of the merge.
    """
    with engine.begin() as conn:
        merged_pks = _patient_pks(conn, *merged)
        if not merged_pks:
            return 0
        survivor_pks = _patient_pks(conn, *survivor)
        moved = 0
        if survivor_pks:
            target = survivor_pks[0]
        else:
            # Nothing stored for the survivor yet: the merged patient's row takes the surviving ID, studies and all.
            target = merged_pks.pop(0)
            conn.execute(
                update(Patient)
                .where(Patient.pk == target)
                .values(patient_id=survivor[0], issuer_of_patient_id=survivor[1])
            )
            moved = len(conn.execute(select(Study.pk).where(Study.patient_pk == target)).all())
        for pk in merged_pks:
            if pk == target:
                continue
            moved += conn.execute(update(Study).where(Study.patient_pk == pk).values(patient_pk=target)).rowcount
            conn.execute(delete(PatientIdentifier).where(PatientIdentifier.patient_pk == pk))
            conn.execute(delete(Patient).where(Patient.pk == pk))
        return moved
