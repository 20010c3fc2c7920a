"""The task lifecycle on the real backend: environments, multi-process launch, quota groups."""

from __future__ import annotations

import os
import shutil
import textwrap
import time
from pathlib import Path

import pytest
import requests

from anylearn_sdk import ResourceState, TaskState, init_sdk, quick_train
from anylearn_sdk.errors import BadRequestError, ConflictError, InvalidArgumentError
from tests.conftest import admin_token, start_server, wait_for_log

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

#: Prints where ``six`` comes from, so a test sees the task ran inside its environment.
SHOW_SIX = textwrap.dedent("""
    import sys, six
    print("six", six.__version__, "from", six.__file__, "prefix", sys.prefix, flush=True)
""")


def algorithm(tmp_path: Path, name: str, files: dict[str, str]) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for rel, text in files.items():
        (folder / rel).write_text(text)
    return folder


def environment_builds(backend) -> dict[str, list[str]]:
    """Environment key -> the build folders under the server's data directory."""
    root = backend.data_dir / "environments"
    return {
        key.name: sorted(p.name for p in key.glob("build-*") if p.is_dir())
        for key in root.iterdir()
    }


def test_same_requirements_build_one_environment(user, backend, tmp_path, quota_group):
    # A pin the mirror (which may hold another six) does not meet, and a key of this test.
    requirements = f"six==1.16.0  # one line of {tmp_path.name}\n"
    common = dict(entrypoint="python show.py", quota_group_name=quota_group, resource_polling=0.2)
    tasks = [
        quick_train(
            algorithm_dir=algorithm(
                tmp_path, f"algo{i}", {"show.py": SHOW_SIX, "requirements.txt": requirements}
            ),
            **common,
        )[0]
        for i in range(2)
    ]
    for task in tasks:
        assert task.wait(timeout=300, poll_interval=0.2) == TaskState.SUCCEEDED
    keys = {task.refresh().runtime.environment for task in tasks}
    assert len(keys) == 1 and None not in keys
    (key,) = keys
    assert len(environment_builds(backend)[key]) == 1  # built once
    venv = backend.data_dir / "environments" / key / "current"
    logs = [task.logs()[0] for task in tasks]
    assert sum(f"building environment {key}" in log for log in logs) == 1
    assert "Successfully installed six-1.16.0" in logs[0]  # the install output, in the log
    assert f"joining the build of environment {key}" in logs[1] or "reusing it" in logs[1]
    for task, log in zip(tasks, logs, strict=True):
        assert f"six 1.16.0 from {venv.resolve()}" in log
        assert task.runtime.python == str(venv.resolve() / "bin" / "python")

    # A third task, long after: the environment is reused, nothing is installed.
    third = quick_train(
        algorithm_dir=algorithm(
            tmp_path, "algo3", {"show.py": SHOW_SIX, "requirements.txt": requirements}
        ),
        **common,
    )[0]
    assert third.wait(timeout=120, poll_interval=0.2) == TaskState.SUCCEEDED
    log = third.logs()[0]
    assert f"environment {key} is built; reusing it" in log
    assert "Successfully installed" not in log
    assert len(environment_builds(backend)[key]) == 1


def test_bad_requirement_fails_with_the_pip_error(user, backend, tmp_path, quota_group):
    folder = algorithm(
        tmp_path,
        "algo",
        {"show.py": SHOW_SIX, "requirements.txt": "anylearn-no-such-package-4f1c==0.0.1\n"},
    )
    task = quick_train(
        algorithm_dir=folder,
        entrypoint="python show.py",
        quota_group_name=quota_group,
        resource_polling=0.2,
    )[0]
    assert task.wait(timeout=300, poll_interval=0.2) == TaskState.FAILED
    task.refresh()
    assert task.error.startswith("pip install -r requirements.txt failed with exit code 1: ERROR:")
    assert "anylearn-no-such-package-4f1c" in task.error
    log = task.logs()[0]
    assert "ERROR: No matching distribution found for anylearn-no-such-package-4f1c" in log
    assert "six 1." not in log and task.command is None  # the entrypoint never ran
    key = task.runtime.environment
    assert key is not None and environment_builds(backend)[key] == []  # nothing half-built kept


def test_three_one_cpu_tasks_run_one_at_a_time_in_order(user, backend, tmp_path):
    name = f"one-cpu-{tmp_path.name[-20:]}".replace("_", "-")
    backend.admin(
        "POST", "/quota-groups", json={"name": name, "capacity": {"cpu": 1}}
    ).raise_for_status()
    folder = algorithm(tmp_path, "algo", {"nap.py": "import time\ntime.sleep(1.0)\n"})
    tasks = [
        quick_train(
            algorithm_dir=folder,
            entrypoint="python nap.py",
            quota_group_name=name,
            quota_group_request={"cpu": 1},
            resource_polling=0.2,
        )[0]
        for _ in range(3)
    ]
    for task in tasks:
        assert task.wait(timeout=120, poll_interval=0.2) == TaskState.SUCCEEDED
    rows = [task.refresh() for task in tasks]
    for earlier, later in zip(rows, rows[1:], strict=False):
        assert earlier.created_at < later.created_at
        assert earlier.finished_at <= later.started_at  # never two at once, oldest first


def test_gpus_are_assigned_by_index(tmp_path):
    data_dir = tmp_path / "server"
    server, url = start_server(data_dir, "--gpus", "2")
    try:
        admin = admin_token(data_dir)
        requests.post(
            f"{url}/api/v1/quota-groups",
            json={"name": "gpus", "capacity": {"cpu": 8, "gpu": 2}},
            headers={"Authorization": f"Bearer {admin}"},
            timeout=30,
        ).raise_for_status()
        init_sdk(url, token=admin)
        release = tmp_path / "release"
        script = textwrap.dedent(f"""
            import os, pathlib, time
            print("devices", repr(os.environ["CUDA_VISIBLE_DEVICES"]), flush=True)
            while not pathlib.Path({str(release)!r}).exists():
                time.sleep(0.05)
        """)
        folder = algorithm(tmp_path, "algo", {"gpu.py": script})

        def submit(gpus: int):
            return quick_train(
                algorithm_dir=folder,
                entrypoint="python gpu.py",
                quota_group_name="gpus",
                quota_group_request={"cpu": 1, "gpu": gpus},
                resource_polling=0.2,
            )[0]

        first, second, none, third = submit(1), submit(1), submit(0), submit(1)
        seen = set()
        for task in (first, second):
            log = wait_for_log(task, "devices")
            seen.add(log.split("devices ", 1)[1].split()[0])
        assert seen == {"'0'", "'1'"}
        assert "devices ''" in wait_for_log(none, "devices")  # no GPU asked, none visible
        assert third.refresh().state == TaskState.QUEUED  # both GPUs are taken
        with pytest.raises(InvalidArgumentError, match=r"exceeds quota group 'gpus' capacity"):
            submit(3)
        requests.post(
            f"{url}/api/v1/quota-groups",
            json={"name": "more-than-there-are", "capacity": {"cpu": 8, "gpu": 8}},
            headers={"Authorization": f"Bearer {admin}"},
            timeout=30,
        ).raise_for_status()
        with pytest.raises(BadRequestError, match=r"never be placed: gpu 3: .* has 2 GPU"):
            quick_train(
                algorithm_dir=folder,
                entrypoint="python gpu.py",
                quota_group_name="more-than-there-are",
                quota_group_request={"cpu": 1, "gpu": 3},
            )
        release.touch()
        for task in (first, second, third, none):
            assert task.wait(timeout=60, poll_interval=0.2) == TaskState.SUCCEEDED
        assert third.refresh().runtime.gpus in ([0], [1])
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.not_database  # ranks and a torch environment; 40 s that PostgreSQL changes nothing of
def test_distributed_example_all_reduce_on_four_ranks(user, quota_group):
    """examples/distributed on 2 nodes x 2 processes; its torch environment is built once."""
    common = dict(
        algorithm_dir=EXAMPLES / "distributed",
        entrypoint="python train.py",
        num_nodes=2,
        nproc_per_node=2,
        quota_group_name=quota_group,
        resource_polling=0.5,
    )
    task = quick_train(**common)[0]
    assert task.wait(timeout=900, poll_interval=0.5) == TaskState.SUCCEEDED, task.logs()[0][-3000:]
    log = task.logs()[0]
    for rank in range(4):
        node, local = divmod(rank, 2)
        assert (
            f"rank {rank}/4 (node {node} local rank {local}): all_reduce sum 10, expected 10" in log
        )

    failing = quick_train(hyperparams={"fail-rank": 3}, **common)[0]
    assert failing.wait(timeout=300, poll_interval=0.5) == TaskState.FAILED
    failing.refresh()
    assert failing.exit_code == 3 and failing.error.startswith("exit code 3")
    assert "rank 3 (node 1 local rank 1): failing on purpose" in failing.logs()[0]


#: Writes its results, or reads the mounts of earlier results (pretrain, models) and prints them.
RESULTS = textwrap.dedent("""
    import os, pathlib, sys
    out = pathlib.Path(os.environ["ANYLEARN_OUTPUT_DIR"])
    if sys.argv[1] == "write":
        (out / "weights.txt").write_text("w=1")
        (out / "latest").symlink_to("weights.txt")
        (out / "escape").symlink_to("/etc")
    else:
        pretrain = pathlib.Path(os.environ["ANYLEARN_PRETRAIN_DIR"])
        print("pretrain", (pretrain / "weights.txt").read_text(), flush=True)
        for folder in os.environ["ANYLEARN_MODEL_DIR"].split(","):
            names = sorted(p.name for p in pathlib.Path(folder).iterdir())
            print("model", names, flush=True)
""")


def test_results_become_inputs(user, tmp_path, quota_group):
    folder = algorithm(tmp_path, "algo", {"results.py": RESULTS})
    common = dict(algorithm_dir=folder, quota_group_name=quota_group, resource_polling=0.2)
    first = quick_train(entrypoint="python results.py write", **common)[0]
    assert first.wait(timeout=60, poll_interval=0.2) == TaskState.SUCCEEDED

    model = first.register_model(name="weights")
    assert (model.name, model.file_count, model.total_bytes) == ("weights", 1, 3)
    assert model.state == ResourceState.READY
    again = first.register_model()
    assert again.id == model.id  # the same content is the same model
    listed = user.get("/models")
    assert [m["id"] for m in listed] == [model.id]

    local_model = tmp_path / "local-model"
    local_model.mkdir()
    (local_model / "vocab.txt").write_text("a b c\n")
    second = quick_train(
        entrypoint="python results.py read",
        pretrain_task_id=first.id,
        model_id=model.id,
        model_dir=local_model,
        **common,
    )[0]
    assert second.wait(timeout=60, poll_interval=0.2) == TaskState.SUCCEEDED
    log = second.logs()[0]
    assert "pretrain w=1" in log
    assert "model ['weights.txt']" in log  # the registered results: links were not kept
    assert "model ['vocab.txt']" in log
    kinds = sorted(i.kind for i in second.refresh().inputs)
    assert kinds == ["model", "model", "pretrain"]

    failed = quick_train(entrypoint="python results.py nothing-to-read", **common)[0]
    assert failed.wait(timeout=60, poll_interval=0.2) == TaskState.FAILED
    with pytest.raises(ConflictError, match=r"is FAILED; only a SUCCEEDED task's results"):
        failed.register_model()


def test_a_slow_checkout_never_delays_a_cancel(tmp_path):
    """The checkout runs on the executor's threads, outside the scheduler's lock: while it
    hangs, the task is QUEUED and a cancel answers; released, it never runs."""
    wrapper = tmp_path / "bin" / "git"
    wrapper.parent.mkdir()
    started, release = tmp_path / "checkout-started", tmp_path / "release"
    wrapper.write_text(
        textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$3" = read-tree ]; then  # git --git-dir REPO read-tree SHA
            touch {started}
            while [ ! -e {release} ]; do sleep 0.05; done
        fi
        exec {shutil.which("git")} "$@"
    """)
    )
    wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}"}
    data_dir = tmp_path / "server"
    server, url = start_server(data_dir, env=env)
    try:
        init_sdk(url, token=admin_token(data_dir))
        folder = algorithm(tmp_path, "algo", {"train.py": "print('ran', flush=True)\n"})
        hung = quick_train(algorithm_dir=folder, entrypoint="python train.py")[0]
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the checkout did not start"
        assert hung.refresh().state == TaskState.QUEUED  # admitted, being prepared
        hung.cancel()
        assert hung.refresh().state == TaskState.CANCELLED
        release.touch()
        after = quick_train(algorithm_dir=folder, entrypoint="python train.py")[0]
        assert after.wait(timeout=60, poll_interval=0.2) == TaskState.SUCCEEDED
        assert hung.refresh().state == TaskState.CANCELLED
        assert "running:" not in hung.logs()[0]
        assert hung.command is None
    finally:
        server.terminate()
        server.wait(timeout=30)
