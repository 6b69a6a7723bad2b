"""The one query engine: C-FIND (PS3.4 C.2.2.2 matching) and QIDO-RS both ask it.

A query names a level (PATIENT, STUDY, SERIES, IMAGE), matching keys by DICOM keyword with their DICOM-encoded
values, and the keys to return. Matching: universal (empty), single value, wildcards (* ?), lists (backslash),
date/time ranges; person names and descriptions case- and accent-insensitive. One query matches and returns the
columns; computed keys (counts, ModalitiesInStudy) then come from one query of the page's series rows, each of which
keeps its instance count, never from one query per row nor by counting instances.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import BindParameter, ColumnElement, Connection, Select, and_, bindparam, exists, or_, select

from storage.models import Instance, Patient, PatientIdentifier, Series, Study
from storage.text import search_key

Level = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
LEVELS: tuple[Level, ...] = ("PATIENT", "STUDY", "SERIES", "IMAGE")
Match = Literal["uid", "str", "key", "date", "time", "int", "computed"]


class QueryError(ValueError):
    """A query the engine cannot answer (unknown level, malformed range...): a client error."""


@dataclass(frozen=True)
class Attr:
    keyword: str
    level: Level
    match: Match
    column: Any = None
    key_column: Any = None  # the search-key column for case/accent-insensitive matching


def _a(keyword: str, level: Level, match: Match, column: Any = None, key_column: Any = None) -> Attr:
    return Attr(keyword, level, match, column, key_column)


ATTRIBUTES: dict[str, Attr] = {
    a.keyword: a
    for a in [
        _a("PatientName", "PATIENT", "key", Patient.patient_name, Patient.patient_name_key),
        _a("PatientID", "PATIENT", "str", Patient.patient_id),
        _a("IssuerOfPatientID", "PATIENT", "str", Patient.issuer_of_patient_id),
        _a("PatientBirthDate", "PATIENT", "date", Patient.patient_birth_date),
        _a("PatientBirthTime", "PATIENT", "time", Patient.patient_birth_time),
        _a("PatientSex", "PATIENT", "str", Patient.patient_sex),
        _a("OtherPatientIDs", "PATIENT", "str", Patient.other_patient_ids),
        _a("OtherPatientIDsSequence", "PATIENT", "computed"),
        _a("NumberOfPatientRelatedStudies", "PATIENT", "computed"),
        _a("NumberOfPatientRelatedSeries", "PATIENT", "computed"),
        _a("NumberOfPatientRelatedInstances", "PATIENT", "computed"),
        _a("StudyInstanceUID", "STUDY", "uid", Study.study_instance_uid),
        _a("StudyDate", "STUDY", "date", Study.study_date),
        _a("StudyTime", "STUDY", "time", Study.study_time),
        _a("AccessionNumber", "STUDY", "str", Study.accession_number),
        _a("StudyID", "STUDY", "str", Study.study_id),
        _a(
            "ReferringPhysicianName",
            "STUDY",
            "key",
            Study.referring_physician_name,
            Study.referring_physician_name_key,
        ),
        _a("StudyDescription", "STUDY", "key", Study.study_description, Study.study_description_key),
        _a("PatientAge", "STUDY", "str", Study.patient_age),
        _a("PatientSize", "STUDY", "str", Study.patient_size),
        _a("PatientWeight", "STUDY", "str", Study.patient_weight),
        _a("InstitutionName", "STUDY", "str", Study.institution_name),
        _a("ModalitiesInStudy", "STUDY", "computed"),
        _a("SOPClassesInStudy", "STUDY", "computed"),
        _a("NumberOfStudyRelatedSeries", "STUDY", "computed"),
        _a("NumberOfStudyRelatedInstances", "STUDY", "computed"),
        _a("SeriesInstanceUID", "SERIES", "uid", Series.series_instance_uid),
        _a("Modality", "SERIES", "str", Series.modality),
        _a("SeriesNumber", "SERIES", "int", Series.series_number),
        _a("SeriesDescription", "SERIES", "str", Series.series_description),
        _a("SeriesDate", "SERIES", "date", Series.series_date),
        _a("SeriesTime", "SERIES", "time", Series.series_time),
        _a("BodyPartExamined", "SERIES", "str", Series.body_part_examined),
        _a("PerformedProcedureStepStartDate", "SERIES", "date", Series.performed_procedure_step_start_date),
        _a("PerformedProcedureStepStartTime", "SERIES", "time", Series.performed_procedure_step_start_time),
        _a("StationName", "SERIES", "str", Series.station_name),
        _a("Manufacturer", "SERIES", "str", Series.manufacturer),
        _a("NumberOfSeriesRelatedInstances", "SERIES", "computed"),
        _a("SOPInstanceUID", "IMAGE", "uid", Instance.sop_instance_uid),
        _a("SOPClassUID", "IMAGE", "uid", Instance.sop_class_uid),
        _a("InstanceNumber", "IMAGE", "int", Instance.instance_number),
        _a("ContentDate", "IMAGE", "date", Instance.content_date),
        _a("ContentTime", "IMAGE", "time", Instance.content_time),
        _a("Rows", "IMAGE", "int", Instance.rows),
        _a("Columns", "IMAGE", "int", Instance.columns),
        _a("NumberOfFrames", "IMAGE", "int", Instance.number_of_frames),
        _a("BitsAllocated", "IMAGE", "int", Instance.bits_allocated),
        _a("AvailableTransferSyntaxUID", "IMAGE", "uid", Instance.transfer_syntax_uid),
    ]
}

_LEVEL_MODEL: dict[Level, Any] = {"PATIENT": Patient, "STUDY": Study, "SERIES": Series, "IMAGE": Instance}
_UNIQUE_KEY: dict[Level, str] = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}


@dataclass
class QueryResult:
    rows: list[dict[str, Any]]
    truncated: bool = False  # more matches exist beyond `limit`
    unsupported: list[str] = field(default_factory=list)  # matching keys the engine does not index


def unique_key(level: Level) -> str:
    return _UNIQUE_KEY[level]


def level_index(level: Level) -> int:
    return LEVELS.index(level)


# --------------------------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------------------------


def _like_pattern(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _range_bounds(value: str, what: str) -> tuple[str, str]:
    low, _, high = value.partition("-")
    return low.strip(), high.strip()


_TIME_MAX = "235959.999999"


def _date_condition(column: Any, value: str) -> ColumnElement[bool]:
    value = value.replace(".", "")  # ACR-NEMA style 2024.01.31
    if "-" in value:
        low, high = _range_bounds(value, "date")
        for bound in (low, high):
            if bound and (len(bound) != 8 or not bound.isdigit()):
                raise QueryError(f"malformed date range {value!r}")
        conditions: list[ColumnElement[bool]] = [column != ""]
        if low:
            conditions.append(column >= low)
        if high:
            conditions.append(column <= high)
        return and_(*conditions)
    if len(value) != 8 or not value.isdigit():
        raise QueryError(f"malformed date {value!r}")
    return column == value


def _time_condition(column: Any, value: str) -> ColumnElement[bool]:
    value = value.replace(":", "")
    if "-" in value:
        low, high = _range_bounds(value, "time")
        conditions: list[ColumnElement[bool]] = [column != ""]
        if low:
            conditions.append(column >= low)
        if high:
            # "-1200" includes everything up to 12:00:59.999999 of a value stored with more precision.
            conditions.append(column <= high + _TIME_MAX[len(high) :])
        return and_(*conditions)
    return or_(column == value, column.like(_like_pattern(value) + "%", escape="\\"))


def _single(attr: Attr, value: str) -> ColumnElement[bool]:
    if attr.match == "uid":
        return attr.column == value
    if attr.match == "int":
        try:
            return attr.column == int(value)  # type: ignore[no-any-return]
        except ValueError as exc:
            raise QueryError(f"{attr.keyword} needs an integer, got {value!r}") from exc
    if attr.match == "date":
        return _date_condition(attr.column, value)
    if attr.match == "time":
        return _time_condition(attr.column, value)
    if attr.match == "key":
        key = search_key(value)
        if _has_wildcard(key):
            return attr.key_column.like(_like_pattern(key), escape="\\")  # type: ignore[no-any-return]
        return attr.key_column == key  # type: ignore[no-any-return]
    if _has_wildcard(value):
        return attr.column.like(_like_pattern(value), escape="\\")  # type: ignore[no-any-return]
    return attr.column == value  # type: ignore[no-any-return]


def _fuzzy(attr: Attr, value: str) -> ColumnElement[bool]:
    """QIDO fuzzymatching: every word of the query starts some word of the name, in any order."""
    words = [w for w in search_key(value).replace("^", " ").replace("*", " ").split() if w]
    if not words:
        return attr.key_column != None  # noqa: E711  # universal
    clauses = []
    for word in words:
        pattern = _like_pattern(word)
        clauses.append(
            or_(
                attr.key_column.like(pattern + "%", escape="\\"),
                attr.key_column.like("% " + pattern + "%", escape="\\"),
                attr.key_column.like("%^" + pattern + "%", escape="\\"),
            )
        )
    return and_(*clauses)


def _computed_condition(keyword: str, value: str) -> ColumnElement[bool] | None:
    if keyword == "ModalitiesInStudy":
        values = [v for v in value.split("\\") if v]
        if not values:
            return None
        conditions = [
            Series.modality.like(_like_pattern(v), escape="\\") if _has_wildcard(v) else Series.modality == v
            for v in values
        ]
        return exists().where(Series.study_pk == Study.pk, or_(*conditions))
    if keyword == "SOPClassesInStudy":
        values = [v for v in value.split("\\") if v]
        if not values:
            return None
        return exists().where(
            Series.study_pk == Study.pk, Instance.series_pk == Series.pk, Instance.sop_class_uid.in_(values)
        )
    if keyword == "OtherPatientIDsSequence":
        return None
    return None


def condition(attr: Attr, value: str, *, fuzzy: bool = False) -> ColumnElement[bool] | None:
    """The SQL condition one matching key adds, or None for universal matching."""
    value = value.strip() if attr.match != "key" else value
    if value == "" or value == "*":
        return None
    if attr.match == "computed":
        return _computed_condition(attr.keyword, value)
    if fuzzy and attr.match == "key":
        return _fuzzy(attr, value)
    if attr.match == "uid":
        values = [v.strip() for v in value.split("\\") if v.strip()]
        return attr.column.in_(values) if len(values) > 1 else attr.column == values[0]  # type: ignore[no-any-return]
    if "\\" in value:
        return or_(*[_single(attr, v) for v in value.split("\\") if v != ""])
    return _single(attr, value)


# --------------------------------------------------------------------------------------------------------------
# The query
# --------------------------------------------------------------------------------------------------------------


def _base(level: Level) -> Select[Any]:
    stmt: Select[Any] = select(_LEVEL_MODEL[level].pk)
    if level == "IMAGE":
        stmt = stmt.select_from(Instance).join(Series, Instance.series_pk == Series.pk)
        stmt = stmt.join(Study, Series.study_pk == Study.pk).join(Patient, Study.patient_pk == Patient.pk)
    elif level == "SERIES":
        stmt = stmt.select_from(Series).join(Study, Series.study_pk == Study.pk)
        stmt = stmt.join(Patient, Study.patient_pk == Patient.pk)
    elif level == "STUDY":
        stmt = stmt.select_from(Study).join(Patient, Study.patient_pk == Patient.pk)
    else:
        stmt = stmt.select_from(Patient)
    return stmt


def find(
    conn: Connection,
    level: Level,
    filters: dict[str, str],
    return_keys: Iterable[str] = (),
    *,
    limit: int | None = None,
    offset: int = 0,
    fuzzy: bool = False,
    patient_root: bool = False,
) -> QueryResult:
    """Match `filters` at `level` and return one dict per match with the unique keys and `return_keys`.

    Keys above `level` may be used for matching (relational query); keys below it are ignored, as C-FIND asks.
    A value is returned for every requested key the index knows; unknown keys come back empty (None).
    """
    if level not in LEVELS:
        raise QueryError(f"unknown query level {level!r}")
    depth = level_index(level)
    stmt = _base(level)
    unsupported: list[str] = []
    for keyword, value in filters.items():
        attr = ATTRIBUTES.get(keyword)
        if attr is None:
            if value not in ("", "*"):
                unsupported.append(keyword)
            continue
        if level_index(attr.level) > depth:
            continue
        cond = condition(attr, value, fuzzy=fuzzy)
        if cond is not None:
            stmt = stmt.where(cond)

    model = _LEVEL_MODEL[level]
    wanted = {unique_key(lv) for lv in LEVELS[: depth + 1]}
    if patient_root or level == "PATIENT":
        wanted.add("PatientID")
    wanted.update(k for k in return_keys if k in ATTRIBUTES and level_index(ATTRIBUTES[k].level) <= depth)
    columns = {k: ATTRIBUTES[k].column for k in wanted if ATTRIBUTES[k].match != "computed"}
    # The matching query returns the columns too: a second query by primary key would cost a round trip and, in
    # PostgreSQL, often a hash join over a whole table.
    stmt = stmt.add_columns(*[c.label(k) for k, c in columns.items()]).order_by(model.pk)
    if offset:
        stmt = stmt.offset(offset)
    if limit is not None:
        stmt = stmt.limit(limit + 1)
    by_pk: dict[int, dict[str, Any]] = {}
    for db_row in conn.execute(stmt).all():
        mapping = db_row._mapping
        by_pk[db_row[0]] = {k: mapping[k] for k in columns}
    truncated = limit is not None and len(by_pk) > limit
    if truncated:
        by_pk = dict(list(by_pk.items())[:limit])
    if not by_pk:
        return QueryResult(rows=[], truncated=False, unsupported=unsupported)

    computed = [k for k in wanted if ATTRIBUTES[k].match == "computed"]
    if computed:
        _fill_computed(conn, level, computed, by_pk)
    rows: list[dict[str, Any]] = []
    for row in by_pk.values():
        for keyword in return_keys:
            row.setdefault(keyword, None)
        rows.append(row)
    return QueryResult(rows=rows, truncated=truncated, unsupported=unsupported)


_SERIES_COUNTS = {"NumberOfStudyRelatedSeries", "NumberOfPatientRelatedSeries"}


def _page(pks: list[int]) -> BindParameter[Any]:
    """A page's primary keys for IN: integers written into the SQL, not one bound parameter each (100 parameters
    cost more to bind and convert, in SQLAlchemy and psycopg, than the query takes to run)."""
    return bindparam("pks", pks, expanding=True, literal_execute=True, unique=True)


def _summaries(conn: Connection, level: Level, pks: list[int]) -> dict[int, dict[str, Any]]:
    """The counts and ModalitiesInStudy of a page of patients, studies or series, from one query of series rows.

    Each series carries its instance count (kept by triggers, see migration 0003), so a page of studies reads a few
    series rows per study instead of counting the index entries of every one of their instances.
    """
    per_pk: dict[int, dict[str, Any]] = {
        pk: {"studies": set(), "series": 0, "instances": 0, "modalities": set()} for pk in pks
    }
    count = Series.number_of_series_related_instances
    stmt: Any
    if level == "SERIES":
        stmt = select(Series.pk, Series.pk, Series.modality, count).where(Series.pk.in_(_page(pks)))
    elif level == "STUDY":
        stmt = select(Series.study_pk, Series.pk, Series.modality, count).where(Series.study_pk.in_(_page(pks)))
    else:
        stmt = (
            select(Study.patient_pk, Study.pk, Series.pk, count)
            .select_from(Study)
            .outerjoin(Series, Series.study_pk == Study.pk)
            .where(Study.patient_pk.in_(_page(pks)))
        )
    for pk, child, value, instances in conn.execute(stmt).all():
        summary = per_pk[pk]
        summary["instances"] += instances or 0
        if level == "STUDY":
            summary["series"] += 1
            if value:
                summary["modalities"].add(value)
        elif level == "PATIENT":
            summary["studies"].add(child)
            summary["series"] += value is not None
    return per_pk


def _fill_computed(conn: Connection, level: Level, keys: Sequence[str], by_pk: dict[int, dict[str, Any]]) -> None:
    """Every computed key of a whole page of results from at most one query per kind of key, never one per row."""
    pks = list(by_pk)
    values: dict[str, dict[int, Any]] = {}
    # Keys of a level above the results' (NumberOfStudyRelatedSeries of a series) stay at their defaults.
    counted = [
        k for k in keys if (k.startswith("NumberOf") or k == "ModalitiesInStudy") and ATTRIBUTES[k].level == level
    ]
    if counted:
        summaries = _summaries(conn, level, pks)
        for keyword in counted:
            if keyword == "ModalitiesInStudy":
                values[keyword] = {pk: sorted(s["modalities"]) for pk, s in summaries.items()}
            elif keyword == "NumberOfPatientRelatedStudies":
                values[keyword] = {pk: len(s["studies"]) for pk, s in summaries.items()}
            elif keyword in _SERIES_COUNTS:
                values[keyword] = {pk: s["series"] for pk, s in summaries.items()}
            else:
                values[keyword] = {pk: s["instances"] for pk, s in summaries.items()}
    if "OtherPatientIDsSequence" in keys and level == "PATIENT":
        items: dict[int, list[dict[str, str]]] = defaultdict(list)
        for patient_pk, value, issuer, type_of_id in conn.execute(
            select(
                PatientIdentifier.patient_pk,
                PatientIdentifier.value,
                PatientIdentifier.issuer,
                PatientIdentifier.type_of_patient_id,
            )
            .where(PatientIdentifier.patient_pk.in_(_page(pks)))
            .order_by(PatientIdentifier.pk)
        ):
            items[patient_pk].append({"PatientID": value, "IssuerOfPatientID": issuer, "TypeOfPatientID": type_of_id})
        values["OtherPatientIDsSequence"] = items
    if "SOPClassesInStudy" in keys and level == "STUDY":
        found: dict[int, list[str]] = defaultdict(list)
        stmt = (
            select(Series.study_pk, Instance.sop_class_uid)
            .join(Instance, Instance.series_pk == Series.pk)
            .where(Series.study_pk.in_(_page(pks)), Instance.sop_class_uid != "")
        )
        for study_pk, value in conn.execute(stmt.distinct().order_by(Series.study_pk, Instance.sop_class_uid)):
            found[study_pk].append(value)
        values["SOPClassesInStudy"] = found
    for keyword in keys:
        per_pk = values.get(keyword, {})
        for pk, row in by_pk.items():
            default: Any = 0 if keyword.startswith("NumberOf") else []
            row[keyword] = per_pk.get(pk, default)


# --------------------------------------------------------------------------------------------------------------
# Retrieve: which stored objects a C-MOVE / C-GET / WADO request names
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredObject:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    blob_key: str
    size: int
    sha256: str
    study_instance_uid: str
    series_instance_uid: str


def objects_for(conn: Connection, level: Level, filters: dict[str, str]) -> list[StoredObject]:
    """The stored objects a retrieve identifier selects (unique keys at and above `level`, any matching key)."""
    stmt = (
        select(
            Instance.sop_class_uid,
            Instance.sop_instance_uid,
            Instance.transfer_syntax_uid,
            Instance.blob_key,
            Instance.size,
            Instance.sha256,
            Study.study_instance_uid,
            Series.series_instance_uid,
        )
        .select_from(Instance)
        .join(Series, Instance.series_pk == Series.pk)
        .join(Study, Series.study_pk == Study.pk)
        .join(Patient, Study.patient_pk == Patient.pk)
    )
    depth = level_index(level)
    any_key = False
    for keyword, value in filters.items():
        attr = ATTRIBUTES.get(keyword)
        if attr is None or level_index(attr.level) > depth:
            continue
        cond = condition(attr, value)
        if cond is not None:
            stmt = stmt.where(cond)
            any_key = True
    if not any_key:
        raise QueryError(f"a {level} retrieve needs {unique_key(level)}")
    stmt = stmt.order_by(Study.pk, Series.series_number, Series.pk, Instance.instance_number, Instance.pk)
    return [StoredObject(*row) for row in conn.execute(stmt)]
