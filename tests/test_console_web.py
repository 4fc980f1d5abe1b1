"""Issue 15: the administrators' console on a running node, driven as people and programs use it.

One node (module scope) with its console and DCMTK storescp as the PACS receives three studies
through DCMTK storescu: the chest CT (analysed, delivered), a copy of it with new UIDs sent while
the PACS was down (its job dead-lettered after one attempt) and an MR study (stored, nothing runs).
Then: an administrator in Debian's Chromium (Playwright) retries the dead letter and uses the rule
tester; roles, CSRF, lock-out and the audit trail through the API and the pages; a sweep of every
page and API response a viewer can reach for the studies' PHI; schemathesis against the OpenAPI.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from node.console.auth import WRONG_LOGIN

from .console import PASSWORDS, ConsoleNode, start_console_node
from .peers import CT_SERIES, MR_SERIES, ROOT, make_studies, series_files, storescu, wait_until
from .viewer import CHROMIUM

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARTEFACTS = Path(os.environ.get("AINODE_TEST_ARTEFACTS", ROOT / "test-artefacts")) / "console"


@pytest.fixture(scope="module")
def console_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ConsoleNode, dict[str, list[Path]]]]:
    tmp = tmp_path_factory.mktemp("console")
    cn = start_console_node(tmp)
    try:
        chest = series_files(CT_SERIES)
        assert storescu(cn.node.port, chest).returncode == 0
        wait_until(lambda: cn.node.job_state(1) == "delivered" or None, 300, 1.0)
        cn.pacs.stop()  # the PACS goes down: the next study's delivery fails, once, and is dead-lettered
        (copy,) = make_studies(CT_SERIES, 1, tmp / "copy")
        assert storescu(cn.node.port, copy).returncode == 0
        wait_until(lambda: cn.node.job_state(2) == "failed" or None, 300, 1.0)
        cn.pacs.start()
        mr = series_files(MR_SERIES)
        assert storescu(cn.node.port, mr).returncode == 0
        wait_until(lambda: cn.node.studies().count("done") == 2 or None, 120, 1.0)
        yield cn, {"chest": chest, "copy": copy, "mr": mr}
    finally:
        cn.node.stop()
        cn.pacs.stop()


def _shot(page: Any, name: str) -> None:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / f"{name}.png"), full_page=True)


def test_an_administrator_retries_a_dead_letter_and_tests_the_rules_in_the_browser(console_node):
    cn, _sent = console_node
    from playwright.sync_api import sync_playwright

    delivered_before = len(cn.pacs.received())
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(cn.url + "/")
            assert "/login" in page.url  # no session: the login page first
            page.fill("input[name=name]", "admin")
            page.fill("input[name=password]", PASSWORDS["admin"])
            page.click("button:has-text('Sign in')")
            page.wait_for_url(cn.url + "/")
            _shot(page, "1-dashboard")
            assert "1 dead letter(s)" in page.inner_text(".tile.alert")

            page.click("nav >> text=Studies")
            _shot(page, "2-studies")
            rows = page.locator("tbody tr").all_inner_texts()
            assert any("done" in r and "1 delivered" in r and "lung-ct-density" in r for r in rows), rows
            assert any("failed" in r and "1 failed" in r for r in rows), rows  # the copy, its job dead

            page.goto(cn.url + "/jobs?state=failed")
            page.click("tbody tr >> a")
            _shot(page, "3-dead-letter")
            assert page.inner_text("h1").endswith("failed")
            assert "PACS" in page.inner_text("dl.facts") or "pacs" in page.inner_text("dl.facts")
            page.click("button:has-text('Retry job')")
            assert "Queue job 2 again?" in page.inner_text("main")  # confirmed on its own page
            page.click("button:has-text('Confirm')")
            assert "job 2 queued again" in page.inner_text(".message")

            def delivered() -> bool | None:
                page.goto(cn.url + "/jobs/2")
                return page.inner_text("h1").endswith("delivered") or None

            wait_until(delivered, 180, 1.0)
            _shot(page, "4-retried-and-delivered")
            assert len(cn.pacs.received()) == delivered_before + 2  # its SEG and SR reached the PACS

            page.click("nav >> text=Routing")
            page.select_option("select[name=series_key]", index=0)
            page.click("button:has-text('Test the rules')")
            explanation = page.inner_text("pre.explanation")
            _shot(page, "5-rule-tester")
            assert "route mr-store-only: MATCH" in explanation or "route chest-ct-lung-density: MATCH" in explanation
            assert "no route matched" not in explanation
        finally:
            browser.close()
    trail = cn.client("admin").get("/api/audit", params={"q": "queued again"}).json()["records"]
    assert [r for r in trail if any(p["user_id"] == "admin" and p["requestor"] for p in r["participants"])]


def test_roles_csrf_lockout_and_the_audit_trail_of_every_action(console_node):
    cn, _sent = console_node
    admin, operator, viewer = cn.client("admin"), cn.client("operator"), cn.client("viewer")

    # wrong password: refused, the same answer as an unknown user
    anon = httpx.Client(base_url=cn.url)
    wrong = anon.post("/api/login", json={"name": "admin", "password": "not-the-password"})
    nobody = anon.post("/api/login", json={"name": "nobody", "password": "not-the-password"})
    assert (wrong.status_code, nobody.status_code) == (401, 401)
    assert wrong.json() == nobody.json() == {"detail": WRONG_LOGIN}
    # three failures lock an account out, even against the right password
    added = cn.cli("users", "add", "locky", "--role", "viewer", "--password-stdin", stdin="locky-password-1234\n")
    assert added.returncode == 0, added.stderr
    for _ in range(3):
        assert anon.post("/api/login", json={"name": "locky", "password": "wrong-password"}).status_code == 401
    locked = anon.post("/api/login", json={"name": "locky", "password": "locky-password-1234"})
    assert locked.status_code == 401 and locked.json() == {"detail": WRONG_LOGIN}  # says nothing of the name
    assert "locked for" in cn.cli("users", "list").stdout
    assert cn.cli("users", "unlock", "locky").returncode == 0
    assert anon.post("/api/login", json={"name": "locky", "password": "locky-password-1234"}).status_code == 200

    jobs = admin.get("/api/jobs").json()
    job_id, study_key = jobs[0]["id"], jobs[0]["study_key"]
    confirm = {"confirm": True}
    # a viewer may not retry, re-run, purge, reload, rotate keys or look up (re-identify): 403
    for path, body in [
        (f"/api/jobs/{job_id}/retry", confirm), (f"/api/studies/{study_key}/rerun", confirm),
        (f"/api/studies/{study_key}/purge", confirm), ("/api/routing/reload", confirm), ("/api/keys/rotate", confirm),
        ("/api/lookup", {"attribute": "PatientID", "value": "x"}),
    ]:  # fmt: skip
        assert viewer.post(path, json=body).status_code == 403, path
    # ... and the pages offer no such button
    assert "Purge study" not in viewer.get(f"/studies/{study_key}").text
    assert "Re-run analysis" not in viewer.get(f"/studies/{study_key}").text
    assert "Reload configuration" not in viewer.get("/routing").text
    assert "Lookup" not in viewer.get("/").text and viewer.get("/lookup").status_code == 403
    page = admin.get(f"/studies/{study_key}").text
    assert "Purge study" in page and "Re-run analysis" in page
    # an operator retries and re-runs, but neither purges nor sees PHI
    assert operator.post(f"/api/studies/{study_key}/purge", json=confirm).status_code == 403

    # CSRF: a POST without the session's token is refused, from a form and from the API
    naked = httpx.Client(base_url=cn.url, cookies=admin.cookies)
    assert naked.post(f"/api/studies/{study_key}/rerun", json=confirm).status_code == 403
    form = naked.post(f"/studies/{study_key}/rerun", data={"confirm": "yes"})
    assert form.status_code == 403 and "CSRF" in form.text
    forged = naked.post(f"/studies/{study_key}/rerun", data={"confirm": "yes", "csrf_token": "forged"})
    assert forged.status_code == 403
    login_form = anon.post("/login", data={"name": "admin", "password": PASSWORDS["admin"], "csrf_token": "x"})
    assert login_form.status_code == 403  # the login form's own double-submit token is missing
    # an action not confirmed is not taken
    assert admin.post(f"/api/studies/{study_key}/rerun", json={"confirm": False}).status_code == 409

    # every admin action, each in the audit trail with its user
    assert operator.post(f"/api/studies/{study_key}/rerun", json=confirm).status_code == 200
    wait_until(lambda: admin.get(f"/api/studies/{study_key}").json()["generation"] == 2 or None, 30)
    assert admin.post("/api/routing/reload", json=confirm).status_code == 200
    assert admin.post("/api/lookup", json={"attribute": "PatientID", "value": "Lung_Dx-A0001"}).status_code == 200
    mr = [s for s in admin.get("/api/studies").json() if s["routes"] == []]
    assert mr, "the MR study (no job) is listed"
    purged = admin.post(f"/api/studies/{mr[0]['study_key']}/purge", json=confirm)
    assert purged.status_code == 200 and "purged" in purged.json()["message"], purged.text
    assert admin.get(f"/api/studies/{mr[0]['study_key']}").status_code == 404
    trail = admin.get("/api/audit", params={"per_page": 500}).json()["records"]

    def by(user: str, text: str) -> list[dict[str, Any]]:
        return [r for r in trail if any(p["user_id"] == user for p in r["participants"])
                and text in (r["description"] or "")]  # fmt: skip

    assert by("operator", f"study {study_key} re-run")
    assert by("admin", "configuration reload done")
    assert by("admin", "console lookup by PatientID") and by("admin", "study attributes viewed")
    assert by("admin", "purged by admin") and by("admin", "console login")
    assert [
        r
        for r in trail
        if r["event"] == "DICOM Study Deleted" and any(p["user_id"] == "admin" for p in r["participants"])
    ]
    assert by("locky", "account locked") and [r for r in trail if r["event"] == "Security Alert"
                                               and "locked for" in (r["description"] or "")]  # fmt: skip


def _phi_of(files: list[Path]) -> set[str]:
    """The identifying values of the studies sent: names, IDs, UIDs, dates (in two spellings)."""
    values: set[str] = set()
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        values |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
        for keyword in ("PatientName", "PatientID", "AccessionNumber", "PatientBirthDate", "StudyDate",
                        "InstitutionName", "ReferringPhysicianName"):  # fmt: skip
            value = str(ds.get(keyword, "") or "")
            if len(value) >= 4:
                values.add(value)
            if keyword.endswith("Date") and len(value) == 8:
                values.add(f"{value[:4]}-{value[4:6]}-{value[6:]}")
    return values


def _crawl(client: httpx.Client, start: list[str], limit: int = 400) -> dict[str, str]:
    """Every same-origin page reachable by links from ``start`` (GET), with its text."""
    bodies: dict[str, str] = {}
    queue = list(start)
    while queue and len(bodies) < limit:
        path = queue.pop(0)
        if path in bodies:
            continue
        response = client.get(path)
        bodies[path] = response.text
        if "text/html" in response.headers.get("content-type", ""):
            for href in re.findall(r'href="([^"]+)"', response.text):
                target = href.replace("&amp;", "&")
                if target.startswith("/") and not target.startswith("//") and target not in bodies:
                    queue.append(target)
    return bodies


def test_no_phi_in_any_page_or_api_response_for_a_viewer(console_node):
    cn, sent = console_node
    phi = _phi_of([f for files in sent.values() for f in files])
    viewer = cn.client("viewer")
    bodies = _crawl(viewer, ["/", "/studies", "/jobs", "/routing", "/models", "/audit", "/keys"])
    crawled = set(bodies)
    assert {p for p in crawled if p.startswith("/jobs/")} and {p for p in crawled if p.startswith("/studies/")}
    assert {"/audit/export?format=xml", "/audit/export?format=json", "/jobs?state=failed"} <= crawled, crawled
    studies, jobs = viewer.get("/api/studies").json(), viewer.get("/api/jobs").json()
    schema = viewer.get("/api/openapi.json").json()
    for path, methods in schema["paths"].items():
        if "get" not in methods:
            continue
        for study in studies or [{}]:
            for job in jobs or [{}]:
                filled = path.replace("{study_key}", study.get("study_key", "x")).replace(
                    "{job_id}", str(job.get("id", 0))
                )
                bodies[filled] = viewer.get(filled).text
    for series in viewer.get("/api/series").json():  # the rule tester is open to viewers: no values in it
        bodies[f"test {series['series_key']}"] = viewer.post(
            "/api/routing/test", json={"series_key": series["series_key"]}
        ).text
    for path in ("/metrics", "/readyz", "/healthz", "/api/audit/export?format=xml", "/api/audit/export?format=json"):
        bodies[path] = viewer.get(path).text
    leaks = {(path, value) for path, body in bodies.items() for value in phi if value in body}
    assert not leaks, sorted(leaks)[:10]
    # the sweep does find PHI where it is shown: an administrator's lookup (re-identification)
    admin = cn.client("admin")
    shown = admin.post(
        "/api/lookup", json={"attribute": "PatientID", "value": pydicom.dcmread(sent["chest"][0]).PatientID}
    )
    assert {v for v in phi if v in shown.text}, "the lookup shows an administrator the study's PHI"


def test_schemathesis_finds_no_server_error_in_the_api(console_node, tmp_path):
    cn, _sent = console_node
    admin = cn.client("admin")
    schema_path = tmp_path / "openapi.json"
    schema_path.write_text(json.dumps(admin.get("/api/openapi.json").json()))
    cookie = "; ".join(f"{name}={value}" for name, value in admin.cookies.items())
    st = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "st"
    st = st if st.exists() else Path(__import__("sys").executable).parent / "st"
    run = subprocess.run(
        [str(st), "run", str(schema_path), "--url", cn.url, "-H", f"Cookie: {cookie}",
         "-H", f"X-CSRF-Token: {admin.headers['X-CSRF-Token']}", "--checks", "not_a_server_error",
         "--max-examples", "25", "--seed", "15", "--request-timeout", "30",
         "--exclude-path", "/api/logout", "--exclude-path", "/api/login", "--exclude-path", "/api/keys/rotate"],
        capture_output=True, text=True, timeout=900, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert re.search(r"\b(\d+) passed\b", run.stdout), run.stdout[-3000:]
    assert admin.get("/api/me").status_code == 200  # the session survived the run


def test_the_console_and_metrics_agree_on_every_count(console_node):
    """Issue 23: one report module behind both (``node.storage.reports``): studies and jobs by
    state, dead letters (every failed job), stored objects."""
    from prometheus_client.parser import text_string_to_metric_families

    cn, _sent = console_node
    dashboard = cn.client("viewer").get("/api/dashboard").json()
    metrics = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(httpx.get(f"{cn.url}/metrics").text)
        for s in family.samples
    }
    for state, count in dashboard["studies"].items():
        assert metrics[("ainode_studies", (("state", state),))] == count, state
    for state, count in dashboard["jobs"].items():
        assert metrics[("ainode_jobs", (("state", state),))] == count, state
    assert sum(v for (name, _l), v in metrics.items() if name == "ainode_jobs") == sum(dashboard["jobs"].values())
    assert metrics[("ainode_dead_letters", ())] == dashboard["dead_letters"] == dashboard["jobs"].get("failed", 0)
