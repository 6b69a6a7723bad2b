"""docker/: the production layout, as far as a machine without a Docker engine can check it.

The image is built from the sources its Dockerfile copies (a wheel, installed apart from the checkout), and
compose.yml's vnpacs services run as processes with exactly the image's and compose's environment. Only what a
container would get from its neighbours is mapped: the `postgres` service to a new PostgreSQL database, `minio` to
SeaweedFS, `redis` to the local Redis, the hospital's SSO to a local JWKS, the HIS to a local MLLP listener,
`/run/secrets/*` to a test PKI, each node's data volume to its own folder and the published ports to free ones.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import hl7
import httpx
import pydicom
import pytest
import yaml
from sqlalchemy.engine import make_url

from pacs.settings import Settings, load_settings, unknown_variables
from tests.data import patient, write_ct
from tests.mllp import ack_code, ack_text, order, pid, send
from tests.scu import dataset_bytes, run_dcmtk
from tests.services import (
    LOOPBACK,
    REPO_ROOT,
    S3Service,
    Service,
    VnpacsService,
    create_pg_database,
    free_ports,
    http_status,
)
from tests.test_auth import Jwks
from tests.test_reports import P12_PASSWORD, make_pki
from tests.test_results import HisListener, wait_for

DOCKER = REPO_ROOT / "docker"
KID = "sso-benh-vien"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yml").read_text("utf-8"))
    return loaded


def vnpacs_services() -> dict[str, dict[str, Any]]:
    """The services built from our Dockerfile (YAML merge keys already applied by the loader)."""
    return {name: svc for name, svc in compose()["services"].items() if "build" in svc}


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text("utf-8"))
    lines = (line.strip() for line in text.splitlines())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and line[0] != "#"]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, args in final_stage():
        if op == "ENV":
            env.update(tuple(pair.split("=", 1)) for pair in shlex.split(args))
    return env


def copied_sources() -> list[str]:
    """What the final stage COPYs from the build context (not from other stages)."""
    sources = []
    for op, args in final_stage():
        if op == "COPY" and not args.startswith("--from"):
            *srcs, _ = args.split()
            sources += srcs
    return sources


def image_command() -> list[str]:
    ((_, args),) = [(op, args) for op, args in final_stage() if op == "CMD"]
    command: list[str] = json.loads(args)
    return command


def healthcheck_command() -> list[str]:
    ((_, args),) = [(op, args) for op, args in final_stage() if op == "HEALTHCHECK"]
    command: list[str] = json.loads(args.split(" CMD ", 1)[1])
    return command


def node_env(name: str) -> dict[str, str]:
    """What the container of service `name` sees: the image's ENV, then the service's environment."""
    return {**image_env(), **{k: str(v) for k, v in vnpacs_services()[name]["environment"].items()}}


# ---- the files themselves ------------------------------------------------------------------------------------


def test_every_variable_the_layout_sets_is_a_valid_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in vnpacs_services():
        env = {k: v for k, v in node_env(name).items() if k.startswith("VNPACS_")}
        assert unknown_variables(env) == [], name
        for key in [k for k in os.environ if k.startswith("VNPACS_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = load_settings()
        assert settings.node_id == name  # each node its own ingest journal
        # Production is secure by default: only the hospital's modalities, only authenticated HTTP.
        assert settings.allowed_aes and settings.auth == "token"
        assert settings.jwks_url and settings.jwt_issuer and settings.jwt_audience
        assert settings.database_url.startswith("postgresql+psycopg://") and settings.storage_url.startswith("s3://")
        assert not settings.outbound_worker  # the worker service delivers to the HIS, not each node
        assert str(settings.data_dir) == "/var/lib/vnpacs" and str(settings.viewer_dir) == "/opt/vnpacs/viewer"
    assert set(image_env()) - set(f"VNPACS_{f.upper()}" for f in Settings.model_fields) == {"PYTHONUNBUFFERED"}


def test_nodes_share_the_index_and_blobs_but_not_their_data_volumes_or_ports() -> None:
    services = vnpacs_services()
    layout = compose()
    envs = {name: node_env(name) for name in services}
    for key in ("VNPACS_DATABASE_URL", "VNPACS_STORAGE_URL", "VNPACS_BROKER_URL", "VNPACS_SIGNING_P12"):
        assert len({env[key] for env in envs.values()}) == 1, key  # one archive, one signing key
    volumes = [svc["volumes"] for svc in services.values()]
    assert all(v and v[0].endswith(":/var/lib/vnpacs") for v in volumes)
    assert len({v[0] for v in volumes}) == len(volumes)  # spool and journal are per node
    assert all(v[0].split(":")[0] in layout["volumes"] for v in volumes)
    published = [port.split(":")[0] for svc in services.values() for port in svc["ports"]]
    assert len(published) == len(set(published))
    assert services["worker"]["command"] == ["vnpacs", "worker"]

    # The credentials the nodes use are the ones the postgres and minio services are created with.
    url = make_url(envs["vnpacs-1"]["VNPACS_DATABASE_URL"])
    postgres = layout["services"]["postgres"]["environment"]
    assert (url.username, url.password, url.host, url.database) == (
        postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], "postgres", postgres["POSTGRES_DB"])  # fmt: skip
    minio = layout["services"]["minio"]["environment"]
    assert envs["vnpacs-1"]["VNPACS_S3_ACCESS_KEY"] == minio["MINIO_ROOT_USER"]
    assert envs["vnpacs-1"]["VNPACS_S3_SECRET_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    assert urlsplit(envs["vnpacs-1"]["VNPACS_STORAGE_URL"]).query.startswith("endpoint=minio:")
    assert urlsplit(envs["vnpacs-1"]["VNPACS_BROKER_URL"]).hostname == "redis"
    for secret in ("VNPACS_SIGNING_P12", "VNPACS_SIGNING_TRUST_ROOTS"):
        name = envs["vnpacs-1"][secret].removeprefix("/run/secrets/")
        assert name in services["vnpacs-1"]["secrets"] and name in layout["secrets"], secret


def test_the_image_fetches_the_viewer_the_makefile_pins() -> None:
    pinned = re.search(r"^OHIF_VERSION\s*:=\s*(\S+)", (REPO_ROOT / "Makefile").read_text(), re.M)
    arg = re.search(r"^ARG OHIF_VERSION=(\S+)", (DOCKER / "Dockerfile").read_text(), re.M)
    assert pinned and arg and pinned.group(1) == arg.group(1)
    assert ("COPY", "--from=viewer /ohif/package/dist /opt/vnpacs/viewer") in final_stage()


# ---- the image's installation, run as compose runs it ------------------------------------------------------


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip install .` of exactly what the Dockerfile copies, into a folder of its own (the image's site-packages)."""
    root = tmp_path_factory.mktemp("image")
    context = root / "src"
    context.mkdir()
    for source in copied_sources():
        origin = REPO_ROOT / source
        if origin.is_dir():
            shutil.copytree(origin, context / source, ignore=shutil.ignore_patterns("__pycache__", "dist"))
        else:
            shutil.copy2(origin, context / source)
    wheels = root / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(context)], check=True, timeout=300)
    (wheel,) = wheels.glob("vnpacs-*.whl")
    site = root / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    return site


def image_process_env(site: Path, **env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("VNPACS_")}
    return {**base, "PYTHONPATH": str(site), **env}


def test_the_image_runs_its_own_installed_copy(image: Path, tmp_path: Path) -> None:
    probe = ("import json, dicomweb, pacs, storage, viewer_api, worklist; "
             "print(json.dumps([m.__file__ for m in (dicomweb, pacs, storage, viewer_api, worklist)]))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe], env=image_process_env(image), cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    for path in json.loads(out):
        assert Path(path).is_relative_to(image), path
    for package in ("storage", "worklist"):  # the schema travels with the package: nodes migrate at start
        assert list((image / package / "migrations" / "versions").glob("0001*.py")), package
        assert (image / package / "migrations" / "script.py.mako").exists()
    assert not (image / "viewer_api" / "dist").exists()  # the viewer is a stage of its own, not in the wheel
    shown = subprocess.run([str(image / "bin" / "vnpacs"), "--help"], env=image_process_env(image), cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert shown.returncode == 0 and "serve" in shown.stdout and "worker" in shown.stdout


class Sso(Jwks):
    """The hospital's SSO: tokens with the issuer and audience compose.yml requires."""

    def token(self, **claims: object) -> str:
        env = node_env("vnpacs-1")
        return self.sign({"sub": "bs.hanh", "iss": env["VNPACS_JWT_ISSUER"], "aud": env["VNPACS_JWT_AUDIENCE"],
                          "exp": int(time.time()) + 600, **claims})  # fmt: skip


@dataclass
class Cluster:
    nodes: dict[str, VnpacsService]
    his: HisListener
    sso: Sso

    def auth(self, **claims: object) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.sso.token(**claims)}"}


def command_of(name: str, site: Path) -> list[str]:
    """Service `name`'s command (compose's, else the image's CMD), run with the image's installed `vnpacs`."""
    program, *args = vnpacs_services()[name].get("command", image_command())
    assert program == "vnpacs"
    return [str(site / "bin" / "vnpacs"), *args]


def _mapped(name: str, site: Path, folder: Path, neighbours: dict[str, str]) -> tuple[dict[str, str], list[int]]:
    """Service `name`'s container environment with its neighbours' addresses replaced by local ones."""
    env = node_env(name)
    env.update(neighbours)
    data = folder / name
    data.mkdir()
    env["VNPACS_DATA_DIR"] = str(data)  # the node's volume
    ports = free_ports(3)
    for kind, port in zip(("DICOM", "HTTP", "HL7"), ports, strict=True):
        env[f"VNPACS_{kind}_HOST"] = LOOPBACK
        env[f"VNPACS_{kind}_PORT"] = str(port)
    return image_process_env(site, **env), ports


@pytest.fixture(scope="module")
def cluster(
    image: Path, weed: S3Service, postgres: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("compose")
    opt_viewer = folder / "opt" / "vnpacs" / "viewer"
    opt_viewer.parent.mkdir(parents=True)
    opt_viewer.symlink_to(REPO_ROOT / "viewer_api" / "dist")  # the image's /opt/vnpacs/viewer
    database = create_pg_database("vnpacs_compose")
    sso = Sso(KID)
    (his_port,) = free_ports(1)
    his = HisListener(his_port)
    his.start()
    with make_pki(folder / "secrets") as pki:
        neighbours = {
            "VNPACS_DATABASE_URL": database.url,
            "VNPACS_STORAGE_URL": weed.url(f"compose-{uuid.uuid4().hex[:10]}"),
            "VNPACS_S3_ACCESS_KEY": weed.access_key,
            "VNPACS_S3_SECRET_KEY": weed.secret_key,
            "VNPACS_BROKER_URL": f"redis://{LOOPBACK}:6379/{int(time.time()) % 14 + 1}",
            "VNPACS_JWKS_URL": sso.url,
            "VNPACS_HIS_ORU_URL": f"mllp://{LOOPBACK}:{his_port}",
            "VNPACS_SIGNING_P12": str(pki.p12),
            "VNPACS_SIGNING_P12_PASSWORD": P12_PASSWORD,
            "VNPACS_SIGNING_TRUST_ROOTS": str(pki.ca_pem),
            "VNPACS_VIEWER_DIR": str(opt_viewer),
        }
        nodes: dict[str, VnpacsService] = {}
        started: list[Service] = []
        try:
            for name in ("vnpacs-1", "vnpacs-2"):
                env, (dicom, http, hl7_port) = _mapped(name, image, folder, neighbours)
                ready = functools.partial(lambda url: http_status(url) == 200, f"http://{LOOPBACK}:{http}/health")
                nodes[name] = VnpacsService(name=name, args=command_of(name, image), env=env,
                                            log_path=folder / f"{name}.log", ready=ready, ready_timeout=90, cwd=folder,
                                            dicom_port=dicom, http_port=http, hl7_port=hl7_port)  # fmt: skip
            # Both nodes start at once on the new, empty database, as `docker compose up` starts them.
            errors: list[BaseException] = []

            def start(svc: Service) -> None:
                try:
                    svc.start()
                except BaseException as exc:  # noqa: BLE001 - re-raised below in the fixture's thread
                    errors.append(exc)

            threads = [threading.Thread(target=start, args=(node,)) for node in nodes.values()]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            started += nodes.values()
            if errors:
                raise errors[0]
            env, _ = _mapped("worker", image, folder, neighbours)
            log = folder / "worker.log"
            worker = Service(name="worker", args=command_of("worker", image), env=env, log_path=log,
                             ready=lambda: log.exists() and "ready." in log.read_text(errors="replace"),
                             ready_timeout=60, cwd=folder)  # fmt: skip
            started.append(worker.start())
            yield Cluster(nodes, his, sso)
        finally:
            for svc in started:
                svc.stop()
            his.stop()
            sso.close()
            database.drop()


def test_both_nodes_pass_the_image_healthcheck(cluster: Cluster) -> None:
    command = healthcheck_command()
    assert command[0] == "python"
    command[0] = sys.executable  # the image's python
    for node in cluster.nodes.values():
        checked = subprocess.run(command, env=node.env, capture_output=True, timeout=30)
        assert checked.returncode == 0, checked.stderr
    (nobody,) = free_ports(1)
    down = subprocess.run(command, env={**os.environ, "VNPACS_HTTP_PORT": str(nobody)}, capture_output=True)
    assert down.returncode != 0  # the same check fails where nothing serves


def test_only_the_hospitals_modalities_are_accepted(cluster: Cluster) -> None:
    node = cluster.nodes["vnpacs-2"]
    ae = node.env["VNPACS_ALLOWED_AES"].split(",")[0]
    ok = run_dcmtk("echoscu", "-aet", ae, "-aec", "VNPACS", LOOPBACK, str(node.dicom_port), timeout=30)
    assert ok.returncode == 0, ok.stderr
    stranger = run_dcmtk("echoscu", "-aet", "LAPTOP", "-aec", "VNPACS", LOOPBACK, str(node.dicom_port), timeout=30)
    assert stranger.returncode != 0 and "Rejected" in stranger.stderr + stranger.stdout


def test_a_study_stored_on_one_node_is_found_and_retrieved_byte_exact_on_the_other(
    cluster: Cluster, tmp_path: Path
) -> None:
    first, second = cluster.nodes["vnpacs-1"], cluster.nodes["vnpacs-2"]
    who = patient("Đặng^Thị Hạnh", "BN-COMPOSE", cccd="", bhyt="")
    files = [write_ct(tmp_path, who=who, study="compose", index=i) for i in (1, 2)]
    ae = first.env["VNPACS_ALLOWED_AES"].split(",")[0]
    stored = run_dcmtk("storescu", "-aet", ae, "-aec", "VNPACS", LOOPBACK, str(first.dicom_port), *map(str, files))
    assert stored.returncode == 0, stored.stderr

    studies = f"{second.base_url}/dicom-web/studies"
    assert httpx.get(studies, params={"PatientName": "dang*"}).status_code == 401
    other_issuer = {"Authorization": f"Bearer {cluster.sso.token(iss='https://sso.khac.example')}"}
    assert httpx.get(studies, params={"PatientName": "dang*"}, headers=other_issuer).status_code == 401
    found = httpx.get(studies, params={"PatientName": "dang*"}, headers=cluster.auth())
    assert found.status_code == 200, found.text
    (study,) = found.json()
    assert study["00100010"]["Value"][0]["Alphabetic"] == "Đặng^Thị Hạnh"
    assert study["00201208"]["Value"] == [2]

    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        got = httpx.get(f"{second.base_url}/wado", headers=cluster.auth(), params={
            "requestType": "WADO", "studyUID": ds.StudyInstanceUID, "seriesUID": ds.SeriesInstanceUID,
            "objectUID": ds.SOPInstanceUID, "contentType": "application/dicom"})  # fmt: skip
        assert got.status_code == 200, got.text
        retrieved = tmp_path / f"retrieved-{ds.SOPInstanceUID}.dcm"
        retrieved.write_bytes(got.content)
        assert dataset_bytes(retrieved) == dataset_bytes(path)


def test_the_bundled_viewer_is_served_from_the_image_folder(cluster: Cluster) -> None:
    node = cluster.nodes["vnpacs-2"]
    page = httpx.get(f"{node.base_url}/viewer/")
    assert page.status_code == 200 and 'src="/viewer/' in page.text
    bundle = sorted((REPO_ROOT / "viewer_api" / "dist").glob("*.bundle.*.js"))[0]
    asset = httpx.get(f"{node.base_url}/viewer/{bundle.name}")
    assert asset.status_code == 200 and asset.content == bundle.read_bytes()


def test_a_report_signed_on_one_node_reaches_the_his_through_the_worker_and_verifies_on_the_other(
    cluster: Cluster, tmp_path: Path
) -> None:
    first, second = cluster.nodes["vnpacs-1"], cluster.nodes["vnpacs-2"]
    # The HIS orders on one node's HL7 listener; the modality sends to the other node.
    ack = send(second.hl7_port, order("ORM^O01^ORM_O01", "CP-MSG-1", "NW", "CP-1", pid("BN-COMPOSE-2", "Lý^Văn Phúc"),
                                      obr={18: "CPACC1", 24: "CT"}))  # fmt: skip
    assert ack_code(ack) == "AA", ack_text(ack)
    who = patient("Lý^Văn Phúc", "BN-COMPOSE-2", cccd="", bhyt="")
    path = write_ct(tmp_path, who=who, study="compose-report", index=1, AccessionNumber="CPACC1")
    ae = first.env["VNPACS_ALLOWED_AES"].split(",")[0]
    stored = run_dcmtk("storescu", "-aet", ae, "-aec", "VNPACS", LOOPBACK, str(first.dicom_port), str(path))
    assert stored.returncode == 0, stored.stderr
    study_uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)

    def ordered() -> dict[str, Any]:
        (found,) = httpx.get(f"{second.base_url}/api/orders", params={"accession": "CPACC1"},
                             headers=cluster.auth()).json()  # fmt: skip
        return found  # type: ignore[no-any-return]

    wait_for("IMAGES_AVAILABLE", lambda: ordered()["status"] == "IMAGES_AVAILABLE")
    assert ordered()["study_instance_uid"] == study_uid
    with httpx.Client(base_url=first.base_url, headers=cluster.auth(), timeout=60) as http:
        created = http.post("/api/reports", json={
            "study_instance_uid": study_uid, "conclusion": "Không thấy bất thường.",
            "author_name": "Trần^Thị Bình", "author_code": "BS00123"})  # fmt: skip
        assert created.status_code == 201, created.text
        report_id = created.json()["id"]
        assert http.post(f"/api/reports/{report_id}/final", json={}).status_code == 200
    received = wait_for("the ORU at the HIS", lambda: [m for m in cluster.his.received if study_uid in m], timeout=60)
    oru = hl7.parse(received[0])
    assert str(oru.segment("OBR").extract_field(1, 25)) == "F"
    assert str(oru.segment("PID").extract_field(1, 3, 1, 1)) == "BN-COMPOSE-2"
    assert str(oru.segment("OBR").extract_field(1, 18)) == "CPACC1"
    time.sleep(2)  # a second delivery (two nodes, a worker) would arrive within the retry delays
    assert len([m for m in cluster.his.received if study_uid in m]) == 1

    # Every node signs with the key from the secrets and checks against the same trust roots.
    verdict = httpx.get(f"{second.base_url}/api/reports/{report_id}/verify", headers=cluster.auth()).json()
    assert verdict["valid"] is True, verdict
    (version,) = verdict["versions"]
    assert not version["development"] and version["chain"]["trusted"]
    assert version["revocation"]["checked"]
