"""The jobs panel with a write key and a running worker: an index job submitted from the page reaches done with
its progress bar full, another is cancelled; a read key is told it needs the write scope."""

from __future__ import annotations

import subprocess
from pathlib import Path

from playwright.sync_api import Locator, Page, expect

from models.shapes_world import generate_scenes, write_collection
from tests.web.conftest import Site, open_with_key

JOB_TIMEOUT_MS = 90_000


def submit_index_job(page: Page, collection: str, folder: Path) -> Locator:
    """Submit an index job from the panel; the new job's row."""
    before = set(page.locator("#job-list .job").evaluate_all("rows => rows.map(row => row.dataset.jobId)"))
    page.select_option("#job-kind", "index")
    page.fill("#job-collection", collection)
    page.fill("#job-paths", str(folder))
    page.click("#submit-job")
    page.wait_for_function(
        "known => [...document.querySelectorAll('#job-list .job')].some(row => !known.includes(row.dataset.jobId))",
        arg=sorted(before),
    )
    new = [
        job_id
        for job_id in page.locator("#job-list .job").evaluate_all("rows => rows.map(row => row.dataset.jobId)")
        if job_id not in before
    ]
    assert len(new) == 1
    return page.locator(f'#job-list .job[data-job-id="{new[0]}"]')


def test_an_index_job_runs_to_done_and_another_is_cancelled(
    page: Page, site: Site, worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    small, large = tmp_path / "small", tmp_path / "large"
    write_collection(generate_scenes("test", 8, seed=101), small, size=64)
    write_collection(generate_scenes("test", 48, seed=102), large, size=64)
    open_with_key(page, site.write_key)

    done = submit_index_job(page, "arriving", small)
    expect(done).to_have_attribute("data-state", "done", timeout=JOB_TIMEOUT_MS)
    progress = done.locator("progress.job-progress")
    expect(progress).to_have_attribute("max", "8")
    expect(progress).to_have_attribute("value", "8")
    expect(done.locator(".job-counts")).to_contain_text("8/8")
    expect(done.locator(".job-cancel")).to_have_count(0)

    cancelled = submit_index_job(page, "arriving-more", large)  # 12 chunks of half a second at least
    expect(cancelled).to_have_attribute("data-state", "running", timeout=JOB_TIMEOUT_MS)
    cancelled.locator(".job-cancel").click()
    expect(cancelled).to_have_attribute("data-state", "cancelled", timeout=JOB_TIMEOUT_MS)
    with site.api(site.write_key) as client:
        record = client.get(f"/v1/jobs/{cancelled.get_attribute('data-job-id')}").json()
    assert record["state"] == "cancelled" and record["done"] < 48


def test_a_read_key_is_told_it_needs_the_write_scope(page: Page, site: Site, tmp_path: Path) -> None:
    open_with_key(page, site.read_key)
    page.select_option("#job-kind", "index")
    page.fill("#job-collection", "never")
    page.fill("#job-paths", str(tmp_path))
    page.click("#submit-job")
    message = page.locator("#job-message")
    expect(message).to_contain_text("write scope")
    expect(message).to_contain_text("lacks the 'write' scope")  # the API's own message too
