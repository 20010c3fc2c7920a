"""The backend's web page, driven in a real headless Chromium (Playwright with Debian's
``chromium``) against the real backend: sign-in, live log and chart, cancel, compare,
sign-out, escaping, CSP, and one user's things hidden from another."""

from __future__ import annotations

import os
import re
import shutil
import textwrap
import uuid
from pathlib import Path

import pytest
import requests

from anylearn_sdk import TaskState, quick_train
from anylearn_sdk.session import init_sdk
from tests.conftest import git

pytestmark = pytest.mark.integration
#: Where the tests leave their screenshots (the README shows one of them).
SCREENSHOTS = Path(os.environ.get("ANYLEARN_SCREENSHOTS", Path(__file__).parents[1] / "build"))

#: Prints a line and logs a loss point every 0.2 s, for a minute.
TICKER = textwrap.dedent("""
    import argparse, time
    from anylearn_sdk import log_metrics
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--ticks", type=int, default=300)
    a = p.parse_args()
    for i in range(a.ticks):
        print(f"tick {i}", flush=True)
        log_metrics({"loss": 1.0 / (1 + i * a.lr)})
        time.sleep(0.2)
""")


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    required = "chromium" in os.environ.get("ANYLEARN_TEST_REQUIRE", "")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            raise
        pytest.skip("playwright is not installed")
    executable = _chromium()
    if executable is None:
        if required:
            pytest.fail("ANYLEARN_TEST_REQUIRE has chromium, and there is no chromium")
        pytest.skip("no chromium (apt-get install chromium)")
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, headless=True)
        yield chromium
        chromium.close()


def _algo(tmp_path: Path, script: str = TICKER) -> Path:
    repo = tmp_path / f"algo-{uuid.uuid4().hex[:6]}"
    repo.mkdir()
    (repo / "train.py").write_text(script)
    git("init", "-q", "-b", "main", cwd=repo)
    git("add", ".", cwd=repo)
    git("commit", "-qm", "ticker", cwd=repo)
    return repo


def _sign_in(page, url: str, username: str, password: str) -> None:
    page.goto(f"{url}/tasks")
    assert "/signin" in page.url  # not signed in: sent to the sign-in page
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("#signin")
    page.wait_for_url(f"{url}/tasks")


def test_sign_in_follow_a_running_task_cancel_compare_and_sign_out(
    browser, user, backend, tmp_path, quota_group
):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    repo = _algo(tmp_path)
    done = quick_train(
        algorithm_dir=repo,
        entrypoint="python train.py",
        hyperparams={"lr": 0.5, "ticks": 5},
        quota_group_name=quota_group,
        task_name="short",
        progress=False,
    )[0]
    assert done.wait(timeout=60, poll_interval=0.2) == TaskState.SUCCEEDED, done.logs()[0]
    running = quick_train(
        algorithm_dir=repo,
        entrypoint="python train.py",
        hyperparams={"lr": 0.1},
        quota_group_name=quota_group,
        task_name="long",
        progress=False,
    )[0]
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on(
        "console", lambda m: errors.append(f"{m.text} {m.location}") if m.type == "error" else None
    )
    _sign_in(page, backend.url, user.username, user.password)
    cookie = next(c for c in context.cookies() if c["name"] == "anylearn_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert running.id in page.inner_text("table.tasks")
    page.screenshot(path=str(SCREENSHOTS / "task-list.png"))

    page.click(f"a[href='/tasks/{running.id}']")
    page.wait_for_url(f"{backend.url}/tasks/{running.id}")
    page.evaluate("window.stillTheSamePage = true")
    # (Playwright's expect() polls without eval, which the page's CSP forbids.)
    expect(page.locator("#log")).to_contain_text("tick 3")
    chart = page.locator(".chart[data-key=loss]")
    expect(chart).to_have_attribute("data-points", re.compile(r"^\d+$"))
    first = int(chart.get_attribute("data-points"))
    expect(page.locator("#log")).to_contain_text("tick 12")
    expect(chart).not_to_have_attribute("data-points", str(first))
    assert int(chart.get_attribute("data-points")) > first
    assert page.evaluate("window.stillTheSamePage")  # grew without a reload
    page.screenshot(path=str(SCREENSHOTS / "task-page.png"), full_page=True)

    page.click("#cancel")
    expect(page.locator("#state")).to_have_text("CANCELLED")
    assert running.refresh().state == TaskState.CANCELLED

    page.goto(f"{backend.url}/tasks")
    page.check(f"#pick-{done.id}")
    page.check(f"#pick-{running.id}")
    page.click("#compare")
    page.wait_for_url("**/compare?**")
    marked = page.locator("tr[data-differs] td.rowname").all_inner_texts()
    assert "hyperparameter lr" in marked and "hyperparameter ticks" in marked
    assert "commit" not in marked  # the same code
    page.wait_for_selector("#overlay .chart[data-key=loss]")
    page.screenshot(path=str(SCREENSHOTS / "compare.png"), full_page=True)

    page.goto(f"{backend.url}/tasks/{done.id}")
    page.click("#register")  # a SUCCEEDED task's results become a model
    page.wait_for_url("**/models?registered=*")
    assert "Registered model" in page.inner_text("main") and "short" in page.inner_text("table")

    page.click("#signout")
    page.wait_for_url("**/signin")
    page.goto(f"{backend.url}/tasks/{done.id}")
    assert "/signin" in page.url  # the session is gone
    assert errors == [], errors  # no CSP violation, no script error
    context.close()


def test_markup_in_names_and_logs_is_text_and_every_page_has_the_csp(
    browser, user, backend, tmp_path, quota_group
):
    evil = "<script>alert(1)</script>"
    script = f"print({evil!r}, flush=True)\nprint('<img src=x onerror=alert(2)>', flush=True)\n"
    task = quick_train(
        algorithm_dir=_algo(tmp_path, script),
        entrypoint="python train.py",
        quota_group_name=quota_group,
        task_name=evil,
        progress=False,
    )[0]
    assert task.wait(timeout=60, poll_interval=0.2) == TaskState.SUCCEEDED
    context = browser.new_context()
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    _sign_in(page, backend.url, user.username, user.password)
    assert evil in page.inner_text("table.tasks")
    page.goto(f"{backend.url}/tasks/{task.id}")
    expect(page.locator("#log")).to_contain_text("onerror")
    assert evil in page.inner_text("h1") and evil in page.inner_text("#log")
    assert page.locator("#log img, h1 script, table script").count() == 0
    assert dialogs == []
    for path in ("/signin", "/tasks", f"/tasks/{task.id}", "/datasets", "/models", "/quota",
                 f"/compare?ids={task.id}", "/static/app.js", "/nope"):  # fmt: skip
        response = page.goto(f"{backend.url}{path}")
        csp = response.headers.get("content-security-policy", "")
        assert "script-src 'self'" in csp and "default-src 'none'" in csp, path
    context.close()


def test_one_user_cannot_see_another_users_task(browser, user, backend, tmp_path, quota_group):
    script = (
        "import os, pathlib\nprint('secret', flush=True)\n"
        "pathlib.Path(os.environ['ANYLEARN_OUTPUT_DIR'], 'model.txt').write_text('weights')\n"
    )
    task = quick_train(
        algorithm_dir=_algo(tmp_path, script),
        entrypoint="python train.py",
        quota_group_name=quota_group,
        progress=False,
    )[0]
    assert task.wait(timeout=60, poll_interval=0.2) == TaskState.SUCCEEDED
    other, password = f"b{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    backend.admin(
        "POST", "/users", json={"username": other, "password": password}
    ).raise_for_status()
    context = browser.new_context()
    page = context.new_page()
    _sign_in(page, backend.url, other, password)
    assert task.id not in page.inner_text("main")
    response = page.goto(f"{backend.url}/tasks/{task.id}")
    assert response.status == 404 and "secret" not in page.content()
    session = {c["name"]: c["value"] for c in context.cookies()}
    paths = (f"/tasks/{task.id}/log", f"/tasks/{task.id}/metrics",
             f"/tasks/{task.id}/files/model.txt", f"/tasks/{task.id}")  # fmt: skip
    for path in paths:
        answer = requests.get(f"{backend.url}{path}", cookies=session, timeout=30)
        assert answer.status_code == 404 and "secret" not in answer.text, path
        assert "weights" not in answer.text, path
    context.close()
    # The owner gets each of them: the 404s above were the other user's, not missing pages.
    owner = requests.Session()
    owner.post(f"{backend.url}/signin", data={"token": user.token}, timeout=30)
    for path in paths:
        assert owner.get(f"{backend.url}{path}", timeout=30).status_code == 200, path
    assert owner.get(f"{backend.url}/tasks/{task.id}/files/model.txt", timeout=30).text == (
        "weights"
    )
    init_sdk(backend.url, token=user.token)


def test_forms_refuse_other_sites_and_stale_sessions(user, backend, tmp_path, quota_group):
    task = quick_train(
        algorithm_dir=_algo(tmp_path),
        entrypoint="python train.py",
        quota_group_name=quota_group,
        progress=False,
    )[0]
    web = requests.Session()
    signed = web.post(
        f"{backend.url}/signin",
        data={"username": user.username, "password": user.password, "next": "/tasks"},
        allow_redirects=False,
        timeout=30,
    )
    assert signed.status_code == 303 and signed.headers["location"] == "/tasks"
    assert (
        "HttpOnly" in signed.headers["set-cookie"]
        and "SameSite=strict" in (signed.headers["set-cookie"])
    )
    page = web.get(f"{backend.url}/tasks/{task.id}", timeout=30).text
    csrf = page.split('name="csrf" value="')[1].split('"')[0]
    cancel = f"{backend.url}/tasks/{task.id}/cancel"
    assert web.post(cancel, data={"csrf": "x"}, timeout=30).status_code == 403
    other_site = {"Origin": "https://evil.example"}
    assert web.post(cancel, data={"csrf": csrf}, headers=other_site, timeout=30).status_code == 403
    assert task.refresh().state != TaskState.CANCELLED
    assert web.post(cancel, data={"csrf": csrf}, timeout=30).status_code == 200  # redirected
    assert task.wait(timeout=30, poll_interval=0.2) == TaskState.CANCELLED
    bad = requests.post(
        f"{backend.url}/signin", data={"username": user.username, "password": "wrong"},
        allow_redirects=False, timeout=30,
    )  # fmt: skip
    assert bad.status_code == 303 and "error=1" in bad.headers["location"]
    assert "set-cookie" not in bad.headers
    with_token = requests.post(
        f"{backend.url}/signin", data={"token": user.token}, allow_redirects=False, timeout=30
    )
    assert with_token.status_code == 303 and user.token not in with_token.headers["set-cookie"]


def test_the_page_follows_the_log_through_a_backend_restart(browser, tmp_path):
    import json

    from tests.conftest import admin_token, start_server

    data_dir = tmp_path / "server"
    server, url = start_server(data_dir)
    try:
        init_sdk(url, token=admin_token(data_dir))
        password = json.loads((data_dir / "admin-credentials.json").read_text())["password"]
        task = quick_train(
            algorithm_dir=_algo(tmp_path), entrypoint="python train.py", progress=False
        )[0]
        context = browser.new_context()
        page = context.new_page()
        _sign_in(page, url, "admin", password)
        page.goto(f"{url}/tasks/{task.id}")
        expect(page.locator("#log")).to_contain_text("tick 5")
        page.evaluate("window.stillTheSamePage = true")
        server.kill()  # the page's reads fail from now on
        server.wait()
        server, _ = start_server(data_dir, port=int(url.rsplit(":", 1)[1]))
        expect(page.locator("#log")).to_contain_text("tick 40")
        log = page.inner_text("#log")
        assert all(log.count(f"tick {i}\n") == 1 for i in range(40)), log  # each line once
        assert page.evaluate("window.stillTheSamePage")
        task.cancel()
        expect(page.locator("#state")).to_have_text("CANCELLED")
        context.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_an_admin_sees_every_users_things_and_is_told_so(user, backend, tmp_path, quota_group):
    task = quick_train(
        algorithm_dir=_algo(tmp_path, "print('hi')\n"),
        dataset_dir=_data(tmp_path),
        entrypoint="python train.py",
        quota_group_name=quota_group,
        progress=False,
    )[0]
    task.wait(timeout=60, poll_interval=0.2)
    admin = requests.Session()
    admin.post(f"{backend.url}/signin", data={"token": backend.admin_token}, timeout=30)
    listed = admin.get(f"{backend.url}/tasks", params={"q": task.id}, timeout=30).text
    assert task.id in listed and "admin: all users" in listed and user.username in listed
    assert admin.get(f"{backend.url}/tasks/{task.id}", timeout=30).status_code == 200
    assert f"owned by {user.username}" in admin.get(f"{backend.url}/tasks/{task.id}").text
    assert user.username in admin.get(f"{backend.url}/datasets", timeout=30).text
    mine = requests.Session()
    mine.post(f"{backend.url}/signin", data={"token": user.token}, timeout=30)
    page = mine.get(f"{backend.url}/tasks", timeout=30).text
    assert "admin: all users" not in page and "<th>owner</th>" not in page


def _data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.csv").write_text("x\n1\n")
    return data
