"""Workdir integrity: results are never reused after their inputs changed, two runs never write
one workdir at once, and damaged or missing workdir files (and Ctrl-C) end in one line.

In process where possible (`run_pipeline`); the lock between two commands and Ctrl-C run
`python -m vitjax.main`.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_bad_inputs import _TINY_FLAGS, _assert_one_line_error, _cli  # noqa: I001
from tiny import tiny_digits

from vitjax import workdir_lock
from vitjax.errors import UserError
from vitjax.stages import provenance, runner
from vitjax.stages import search as search_stage
from vitjax.workdir import read_json

REPO = Path(__file__).resolve().parents[1]


def small_search(config):
    config.search.update(population=3, iterations=2, restarts=1, baselines=())
    return config


@pytest.fixture(scope="module")
def finished(tiny_pretrained, tmp_path_factory):
    """A workdir with pretrain and search finished (copied by the tests that change it)."""
    path = _copy(tiny_pretrained, tmp_path_factory.mktemp("finished") / "run")
    config = small_search(tiny_digits())
    config.stages = "pretrain,search"
    runner.run_pipeline(config, path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _eval_count(log: Path) -> int:
    return sum(json.loads(line)["type"] == "eval" for line in log.read_text().splitlines())


def _kill_search_after(monkeypatch, evaluations: int) -> None:
    """The search stage's objective raises KeyboardInterrupt after `evaluations` policies."""
    original = search_stage.make_objective
    calls = []

    def counting(ctx, params, ranks, **kw):
        objective = original(ctx, params, ranks, **kw)

        def wrapped(policies):
            if len(calls) >= evaluations:
                raise KeyboardInterrupt
            calls.extend(policies)
            return objective(policies)
        return wrapped

    monkeypatch.setattr(search_stage, "make_objective", counting)


# -- 1. results are never reused after their inputs changed ---------------------------------------

def test_unfinished_search_is_discarded_when_the_supernet_was_retrained(pretrained_copy,
                                                                         monkeypatch, capsys):
    workdir = pretrained_copy
    config = small_search(tiny_digits())
    config.stages = "pretrain,search"
    _kill_search_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        runner.run_pipeline(config, workdir)
    monkeypatch.undo()
    log = workdir / "search" / "log.jsonl"
    assert _eval_count(log) == 2 and not (workdir / "search" / "DONE.json").exists()
    # The supernet is retrained (another step count) before the search is resumed.
    retrained = small_search(tiny_digits())
    retrained.train.steps = 6
    retrained.stages = "pretrain"
    retrained.overwrite = True
    runner.run_pipeline(retrained, workdir)
    capsys.readouterr()
    retrained.stages = "pretrain,search"
    retrained.overwrite = False
    runner.run_pipeline(retrained, workdir)
    out = capsys.readouterr().out
    assert "search: discarding its unfinished results" in out and "pretrain was redone" in out
    # Every logged value is of the retrained supernet, and the header says which one it is.
    header = json.loads(log.read_text().splitlines()[0])
    supernet = read_json(workdir / "pretrain" / "DONE.json")["identity"]
    assert header["provenance"]["supernet"] == supernet
    assert header["provenance"]["objective"] == retrained.search.objective
    assert _eval_count(log) == 3 + 2
    done = read_json(workdir / "search" / "DONE.json")
    assert done["inputs"]["pretrain"] == supernet and done["evaluations"] == 5


def test_unfinished_search_with_another_objective_is_refused_naming_it(pretrained_copy,
                                                                        monkeypatch):
    workdir = pretrained_copy
    config = small_search(tiny_digits())
    config.stages = "pretrain,search"
    _kill_search_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        runner.run_pipeline(config, workdir)
    monkeypatch.undo()
    changed = small_search(tiny_digits())
    changed.stages = "search"
    changed.search.objective = "accuracy"
    with pytest.raises(UserError) as info:
        runner.run_pipeline(changed, workdir)
    message = str(info.value)
    assert "search.objective: 'accuracy_minus_loss' -> 'accuracy'" in message
    assert "--config.overwrite=True" in message and "\n" not in message
    assert _eval_count(workdir / "search" / "log.jsonl") == 2  # nothing lost
    # overwrite=True discards unfinished results too (here with a setting the log header
    # pins as well), not only finished ones.
    changed.overwrite = True
    changed.search.population = 4
    runner.run_pipeline(changed, workdir)
    header = json.loads((workdir / "search" / "log.jsonl").read_text().splitlines()[0])
    assert header["provenance"]["objective"] == "accuracy" and header["population"] == 4
    assert _eval_count(workdir / "search" / "log.jsonl") == 4 + 2


def test_search_log_header_refuses_another_supernet_or_objective(tmp_path):
    """The library's own check, for logs the runner cannot see (run_search called directly)."""
    from vitjax.models import ViTConfig
    from vitjax.search import run_search

    config = ViTConfig(num_classes=10, image_size=32, patch_size=8, embed_dim=16, depth=2,
                       num_heads=2, mlp_dim=32)
    target = 0.7 * __import__("vitjax.pruning", fromlist=["count_flops"]).count_flops(
        config).total
    log = tmp_path / "log.jsonl"

    def objective(policies):
        return [float(sum(p.neuron)) for p in policies]

    kwargs = dict(log_path=log, method="random", population=2, iterations=0)
    run_search(objective, config, target, provenance={"supernet": "aaa", "objective": "x"},
               **kwargs)
    with pytest.raises(UserError, match=r"supernet \(logged 'aaa', now 'bbb'\)"):
        run_search(objective, config, target, provenance={"supernet": "bbb", "objective": "x"},
                   **kwargs)


def test_unfinished_pretraining_is_not_resumed_with_another_seed(tmp_path, monkeypatch):
    from vitjax.training import StepBatches

    config = tiny_digits()
    config.stages = "pretrain"
    original = StepBatches.__call__

    def killed_at_step_3(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(StepBatches, "__call__", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        runner.run_pipeline(config, tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "pretrain" / "checkpoints" / "2").is_dir()
    for key, value in (("seed", 1), ("data.seed", 3)):
        other = tiny_digits()
        other.stages = "pretrain"
        section, _, leaf = key.rpartition(".")
        (other[section] if section else other)[leaf] = value
        with pytest.raises(UserError) as info:
            runner.run_pipeline(other, tmp_path)
        assert f"{key}: 0 -> {value}" in str(info.value) and "\n" not in str(info.value)
        assert (tmp_path / "pretrain" / "checkpoints" / "2").is_dir()  # kept
    # overwrite=True discards the unfinished run and starts afresh with the new seed.
    other.overwrite = True
    runner.run_pipeline(other, tmp_path)
    assert read_json(tmp_path / "pretrain" / "DONE.json")["config"]["data.seed"] == 3


def test_a_report_run_early_is_redone_when_a_stage_it_reads_finishes(finished, tmp_path,
                                                                      capsys):
    workdir = _copy(finished, tmp_path / "run")
    config = small_search(tiny_digits())
    config.stages = "pretrain,report"
    shutil.rmtree(workdir / "search")
    runner.run_pipeline(config, workdir)
    assert "| gp |" not in (workdir / "report" / "report.md").read_text()
    config.stages = "search"
    runner.run_pipeline(config, workdir)
    capsys.readouterr()
    config.stages = "report"
    runner.run_pipeline(config, workdir)
    out = capsys.readouterr().out
    assert "report: its results are out of date (search finished after it), redoing it" in out
    search = read_json(workdir / "search" / "DONE.json")
    report = (workdir / "report" / "report.md").read_text()
    assert f"| gp | {search['methods']['gp']['best_value']:.4f} |" in report
    # Up to date now: skipped.
    runner.run_pipeline(config, workdir)
    assert "report (1/1): done earlier with this config, skipped" in capsys.readouterr().out


def test_a_stage_read_but_not_redone_must_be_up_to_date(finished, tmp_path):
    workdir = _copy(finished, tmp_path / "run")
    config = small_search(tiny_digits())
    done = read_json(workdir / "search" / "DONE.json")
    done["inputs"]["pretrain"] = "0" * 16  # as if pretrain was redone after the search
    (workdir / "search" / "DONE.json").write_text(json.dumps(done))
    config.stages = "prune"
    with pytest.raises(UserError, match=r"stage 'search', which prune reads, is out of date "
                                        r"\(pretrain was redone since\); add it to"):
        runner.run_pipeline(config, workdir)


# -- 3. damaged or missing workdir files --------------------------------------------------------

def test_invalid_done_json_is_redone_and_what_was_built_on_it_is_kept(finished, tmp_path,
                                                                     capsys):
    workdir = _copy(finished, tmp_path / "run")
    identity = read_json(workdir / "pretrain" / "DONE.json")["identity"]
    (workdir / "pretrain" / "DONE.json").write_text('{"metrics": {"eval/te')
    (workdir / "score").mkdir()
    (workdir / "score" / "DONE.json").write_text("not json")  # a stage nobody reads here
    config = small_search(tiny_digits())
    config.stages = "pretrain,search"
    runner.run_pipeline(config, workdir)
    out = capsys.readouterr().out
    assert f"{workdir / 'pretrain' / 'DONE.json'} is not valid JSON" in out
    assert "pretrain counts as not run and is redone" in out
    assert "search (2/2): done earlier with this config, skipped" in out
    # Redone from its final checkpoint: the very same supernet, so the search stays valid.
    assert read_json(workdir / "pretrain" / "DONE.json")["identity"] == identity
    assert (workdir / "pretrain" / "DONE.json.invalid").exists()


@pytest.mark.parametrize("damage", ["truncated supernet", "missing ranks", "missing policy"])
def test_missing_or_truncated_results_are_redone(finished, tmp_path, capsys, damage):
    workdir = _copy(finished, tmp_path / "run")
    stage, name = {"truncated supernet": ("pretrain", "supernet.safetensors"),
                   "missing ranks": ("pretrain", "ranks.npz"),
                   "missing policy": ("search", "best_policy.json")}[damage]
    path = workdir / stage / name
    original = path.read_bytes()
    digest = provenance.content_digest(path)
    if damage.startswith("truncated"):
        path.write_bytes(original[: len(original) // 2])
    else:
        path.unlink()
    evaluations = _eval_count(workdir / "search" / "log.jsonl")
    config = small_search(tiny_digits())
    config.stages = "pretrain,search,prune"
    runner.run_pipeline(config, workdir)
    out = capsys.readouterr().out
    assert f"{stage}/DONE.json lists results that are gone or changed: {name}" in out
    # Rewritten from the checkpoint / the search log: the same content.
    assert provenance.content_digest(path) == digest
    assert _eval_count(workdir / "search" / "log.jsonl") == evaluations  # nothing re-evaluated
    assert read_json(workdir / "prune" / "DONE.json")["policy"] == read_json(
        workdir / "search" / "DONE.json")["best_policy"]


def test_damaged_supernet_without_a_file_record_is_one_line(finished, tmp_path):
    """DONE.json files written before the file record: the reader names the file and the fix."""
    workdir = _copy(finished, tmp_path / "run")
    done = read_json(workdir / "pretrain" / "DONE.json")
    del done["files"]
    (workdir / "pretrain" / "DONE.json").write_text(json.dumps(done))
    path = workdir / "pretrain" / "supernet.safetensors"
    original = path.read_bytes()
    path.write_bytes(original[:1000])
    config = small_search(tiny_digits())
    config.stages = "score"
    with pytest.raises(UserError) as info:
        runner.run_pipeline(config, workdir)
    message = str(info.value)
    assert f"{path} cannot be read" in message and "--config.stages=pretrain" in message
    assert "\n" not in message
    path.write_bytes(original)
    (workdir / "pretrain" / "ranks.npz").unlink()
    config.stages = "search"
    shutil.rmtree(workdir / "search")
    with pytest.raises(UserError, match="ranks.npz is missing although stage 'pretrain' "
                                        "finished"):
        runner.run_pipeline(config, workdir)


# -- 2. the workdir lock ------------------------------------------------------------------------

def _lock_record(path: Path, **fields) -> None:
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-01-01 00:00:00",
              "command": "python -m vitjax.main --config=configs/digits.py", "token": "t0",
              "heartbeat": time.time()}
    record.update(fields)
    path.mkdir(parents=True, exist_ok=True)
    (path / workdir_lock.LOCK_FILE).write_text(json.dumps(record))


def test_a_held_lock_refuses_a_second_run_naming_the_holder(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock_record(tmp_path, pid=sleeper.pid)
        config = tiny_digits()
        config.stages = "pretrain"
        with pytest.raises(UserError) as info:
            runner.run_pipeline(config, tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    message = str(info.value)
    assert f"is in use by another vitjax run: pid {sleeper.pid} on {socket.gethostname()}, " \
           "started 2026-01-01 00:00:00 UTC (python -m vitjax.main --config=configs/" \
           "digits.py)" in message
    assert "\n" not in message and not (tmp_path / "pretrain").exists()


@pytest.mark.parametrize("holder", ["dead pid", "other host, old heartbeat", "unreadable"])
def test_stale_locks_are_taken_over(tmp_path, capsys, holder):
    if holder == "dead pid":
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        _lock_record(tmp_path, pid=gone.pid)
    elif holder == "other host, old heartbeat":
        _lock_record(tmp_path, host="elsewhere",
                     heartbeat=time.time() - workdir_lock.STALE_AFTER_S - 60)
    else:
        (tmp_path / workdir_lock.LOCK_FILE).write_text('{"host": "x", "pi')
        old = time.time() - workdir_lock.STALE_AFTER_S - 60
        os.utime(tmp_path / workdir_lock.LOCK_FILE, (old, old))
    lock = workdir_lock.WorkdirLock(tmp_path)
    lock.acquire()
    assert "taking over the lock" in capsys.readouterr().out
    assert read_json(tmp_path / workdir_lock.LOCK_FILE)["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / workdir_lock.LOCK_FILE).exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing left behind


def test_a_live_lock_on_another_host_is_respected(tmp_path):
    _lock_record(tmp_path, host="elsewhere", pid=1)
    with pytest.raises(UserError, match="pid 1 on elsewhere"):
        workdir_lock.WorkdirLock(tmp_path).acquire()


def test_of_runs_starting_together_exactly_one_gets_the_lock(tmp_path):
    results = []
    barrier = threading.Barrier(8)

    def contend():
        lock = workdir_lock.WorkdirLock(tmp_path)
        barrier.wait()
        try:
            lock.acquire()
            results.append(lock)
        except UserError:
            results.append(None)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    winners[0].release()


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    lock = workdir_lock.WorkdirLock(tmp_path, heartbeat_s=0.05)
    lock.acquire()
    first = read_json(tmp_path / workdir_lock.LOCK_FILE)["heartbeat"]
    time.sleep(0.5)
    assert read_json(tmp_path / workdir_lock.LOCK_FILE)["heartbeat"] > first
    lock.release()


def test_only_process_0_of_a_job_takes_the_lock(tmp_path, monkeypatch):
    """The other processes of a multi-host job share the workdir: never refused by the lock."""
    _lock_record(tmp_path, pid=os.getpid())  # held (by "process 0", this test)

    class OtherProcess:
        is_main = False
        workdir = tmp_path

    with runner._locked(OtherProcess()):
        pass
    assert read_json(tmp_path / workdir_lock.LOCK_FILE)["token"] == "t0"  # untouched

    class MainProcess(OtherProcess):
        is_main = True

    with pytest.raises(UserError, match="in use by another vitjax run"):
        with runner._locked(MainProcess()):
            pass


@pytest.mark.subprocess
def test_two_commands_on_one_workdir_and_ctrl_c(tmp_path):
    """A second command on a busy workdir stops with one line; Ctrl-C saves a checkpoint, prints
    one line and exits 130; the rerun resumes from that checkpoint."""
    flags = dict(_TINY_FLAGS, **{"train.steps": 100000, "train.ckpt_every": 0,
                                 "train.eval_every": 0, "train.log_every": 1000})
    args = ["--config=configs/digits.py:scratch", f"--workdir={tmp_path}",
            "--config.stages=pretrain",
            *(f"--config.{k}={v}" for k, v in flags.items())]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    first = subprocess.Popen([sys.executable, "-m", "vitjax.main", *args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        events = tmp_path / "pretrain"
        # Training is under way once the first metrics file exists.
        while time.time() < deadline and not any(events.glob("events.out.tfevents*")):
            assert first.poll() is None, first.communicate()[1][-3000:]
            time.sleep(0.5)
        second = _cli(*args)
        _assert_one_line_error(second, f"is in use by another vitjax run: pid {first.pid} on "
                                       f"{socket.gethostname()}")
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert lines == ["error: interrupted (Ctrl-C); finished work is kept: rerun the same "
                     "command to resume"], err[-3000:]
    saved = [line for line in out.splitlines() if "interrupted: saved a checkpoint" in line]
    assert saved, out[-3000:]
    step = int(saved[0].split("at step ")[1].split()[0])
    assert (tmp_path / "pretrain" / "checkpoints" / str(step)).is_dir()
    assert not (tmp_path / workdir_lock.LOCK_FILE).exists()


def test_identity_is_of_the_content_not_of_how_it_was_written(tmp_path):
    """Equal results give equal identities: a safetensors header in another key order (its
    writer's hash map orders it differently in every process) and an npz written later."""
    import numpy as np
    from etils import epath

    from vitjax.workdir import write_npz

    data = np.arange(6, dtype=np.float32).tobytes()
    headers = ['{"__metadata__":{"a":"1","b":"2"},"w":{"dtype":"F32","shape":[6],'
               '"data_offsets":[0,24]}}',
               '{"w":{"dtype":"F32","shape":[6],"data_offsets":[0,24]},'
               '"__metadata__":{"b":"2","a":"1"}}']
    for index, header in enumerate(headers):
        blob = header.encode()
        (tmp_path / f"{index}.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob
                                                        + data)
    first, second = (provenance.content_digest(epath.Path(tmp_path / f"{i}.safetensors"))
                     for i in range(2))
    assert first == second
    write_npz(tmp_path / "a.npz", {"rank_head": np.arange(4)})
    time.sleep(2.1)  # zip timestamps have a resolution of 2 s
    write_npz(tmp_path / "b.npz", {"rank_head": np.arange(4)})
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    np.testing.assert_array_equal(np.load(tmp_path / "b.npz")["rank_head"], np.arange(4))
