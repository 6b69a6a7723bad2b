"""WADO-URI (PS3.18 9): `/wado?requestType=WADO&studyUID=…&seriesUID=…&objectUID=…&contentType=…`."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from dicomweb.imaging import ImagingError, RenderOptions, render, transcoded_to_explicit_le
from dicomweb.lookup import stored_objects
from storage.blobstore import BlobStoreError
from storage.ingest import Archive

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


def router(archive: Archive) -> APIRouter:
    api = APIRouter(tags=["WADO-URI"])

    @api.get("/wado", summary="WADO-URI retrieve")
    async def wado(request: Request) -> Response:
        q = request.query_params
        if q.get("requestType") != "WADO":
            raise HTTPException(400, "requestType must be WADO")
        missing = [k for k in ("studyUID", "seriesUID", "objectUID") if not q.get(k)]
        if missing:
            raise HTTPException(400, f"missing {', '.join(missing)}")
        filters = {"StudyInstanceUID": q["studyUID"], "SeriesInstanceUID": q["seriesUID"],
                   "SOPInstanceUID": q["objectUID"]}  # fmt: skip
        obj = stored_objects(archive, "IMAGE", filters)[0]
        content_types = [c.strip().split(";")[0] for c in q.get("contentType", "image/jpeg").split(",")]
        try:
            if "application/dicom" in content_types:
                wanted = q.get("transferSyntax", EXPLICIT_VR_LITTLE_ENDIAN)
                if wanted not in (obj.transfer_syntax_uid, EXPLICIT_VR_LITTLE_ENDIAN):
                    raise HTTPException(406, f"available as stored ({obj.transfer_syntax_uid}) or in Explicit VR LE")

                def read() -> bytes:
                    with archive.blobs.local_file(obj.blob_key) as path:
                        if wanted == obj.transfer_syntax_uid:
                            return path.read_bytes()
                        return transcoded_to_explicit_le(path)

                return Response(await run_in_threadpool(read), media_type="application/dicom")
            media = next((c for c in content_types if c in ("image/jpeg", "image/png")), None)
            if media is None:
                raise HTTPException(406, "contentType must be application/dicom, image/jpeg or image/png")
            window = None
            if q.get("windowCenter") and q.get("windowWidth"):
                window = (float(q["windowCenter"]), float(q["windowWidth"]), "linear")
            viewport = (int(q["columns"]), int(q["rows"])) if q.get("columns") and q.get("rows") else None
            options = RenderOptions(media_type=media, quality=int(q.get("imageQuality", "90")), window=window,
                                    viewport=viewport)  # fmt: skip
            frame = int(q.get("frameNumber", "1"))

            def draw() -> bytes:
                with archive.blobs.local_file(obj.blob_key) as path:
                    return render(path, frame, options)

            return Response(await run_in_threadpool(draw), media_type=media)
        except ValueError as exc:
            if isinstance(exc, ImagingError):
                raise HTTPException(406, str(exc)) from exc
            raise HTTPException(400, f"bad parameter: {exc}") from exc
        except IndexError as exc:
            raise HTTPException(404, str(exc)) from exc
        except BlobStoreError as exc:
            raise HTTPException(503, f"storage unavailable: {exc}") from exc

    return api
