"""Fault suite, reward functions (issue 9, items 6 and 9): hostile user rewards, for real.

A catastrophic regex and a busy loop under ``reward.timeout_s`` (the worker is killed and
nothing keeps spinning), ``sys.exit(0)``, ``os._exit``, ``KeyboardInterrupt``, ±inf / NaN
scores, a function that mutates its inputs, and reward files that do not import or name
something that is not a function.  Most tests call the :class:`Rewarder` directly; one short
toy:tiny run and one ``launch/train.py`` run check the same faults end to end.
"""
import math
import os
import subprocess
import sys
import threading
import time

import psutil
import pytest

from rlkit import reward_pool
from rlkit.config import ConfigError, RewardConfig, load_config
from rlkit.rewarding import RewardError, Rewarder
from tests.conftest import REPO, read_metrics, tiny_overrides

HOSTILE = '''
import os, re, sys


def _note_pid(pidfile):
    if pidfile:
        with open(pidfile, "a") as f:
            f.write(f"{os.getpid()}\\n")


def ok(completions, **kw):
    return [1.0] * len(completions)


def regex(completions, pidfile=None, **kw):
    _note_pid(pidfile)
    return [float(bool(re.match(r"(a+)+$", "a" * 34 + "!")))] * len(completions)   # catastrophic backtracking


def busy(completions, pidfile=None, stopfile=None, **kw):
    _note_pid(pidfile)
    while not (stopfile and os.path.exists(stopfile)):   # spins until killed (or told to stop, in-process)
        pass


def exit0(completions, **kw):
    sys.exit(0)


def hard_exit(completions, **kw):
    os._exit(3)


def interrupt(completions, **kw):
    raise KeyboardInterrupt


def infs(completions, **kw):
    values = [float("inf"), float("-inf"), float("nan"), 1.0]
    return [values[i % 4] for i in range(len(completions))]


def mutate(prompts, completions, completion_ids, answer, **kw):
    completions[0] = "HACKED"
    prompts.clear()
    answer.append("extra")
    completion_ids[0].append(999)
    return [0.0] * len(completions)


def intact(prompts, completions, completion_ids, answer, **kw):
    same = prompts == ["p0", "p1"] and completions == ["c0", "c1"] and answer == ["1", "2"] \\
        and completion_ids == [[1, 2], [3]]
    return [1.0 if same else -1.0] * len(completions)
'''
ALL = ["ok", "regex", "busy", "exit0", "hard_exit", "interrupt", "infs", "mutate", "intact"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "hostile.py"
    path.write_text(HOSTILE)
    # one Rewarder naming every function first, so the tests below share one worker pool (start-up is paid once)
    Rewarder(RewardConfig(functions=[f"{path}:{n}" for n in ALL], timeout_s=2.0))
    yield str(path)
    reward_pool.shutdown()


def _call(rewarder, n=2):
    return rewarder(prompts=[f"p{i}" for i in range(n)], completions=[f"c{i}" for i in range(n)],
                    completion_ids=[[1, 2], [3]][:n], columns={"answer": [str(i + 1) for i in range(n)]})


@pytest.fixture(autouse=True)
def _children_before():
    """Child processes that other tests of the session left running (e.g. an engine's workers): not ours to judge."""
    global _OLD_CHILDREN
    _OLD_CHILDREN = {c.pid for c in psutil.Process().children(recursive=True)}
    yield


_OLD_CHILDREN: set = set()


def _cpu_over(pids, window_s):
    """CPU seconds each of ``pids`` (children of this process, not left by earlier tests) burns over ``window_s``."""
    me = psutil.Process()

    def times():
        out = {}
        for c in me.children(recursive=True):
            if c.pid in _OLD_CHILDREN or (pids is not None and c.pid not in pids):
                continue
            try:
                out[c.pid] = sum(c.cpu_times()[:2])
            except psutil.Error:
                pass
        return out
    before = times()
    time.sleep(window_s)
    after = times()
    return {pid: after[pid] - before.get(pid, 0.0) for pid in after}


def _spinning_children(window_s=1.0, windows=3):
    """Child processes started by this test that keep burning CPU: more than 30% of a core in each of ``windows``
    consecutive windows (a spinning busy loop gets most of a core all the time; a reward worker that is still
    importing its modules, e.g. a pool restarted with every reward file of the session, settles within seconds)."""
    busy = None
    for _ in range(windows):
        used = _cpu_over(busy, window_s)
        busy = {pid for pid, u in used.items() if u > 0.3 * window_s}
        if not busy:
            return []
    return sorted((pid, round(used[pid], 2)) for pid in busy)


@pytest.mark.timeout(180)
def test_catastrophic_regex_and_busy_loop_are_killed_and_nothing_keeps_spinning(hostile, tmp_path):
    pidfile = str(tmp_path / "pids")
    r = Rewarder(RewardConfig(functions=[{"name": f"{hostile}:regex", "pidfile": pidfile},
                                         {"name": f"{hostile}:busy", "pidfile": pidfile}, f"{hostile}:ok"],
                              timeout_s=1.0))
    assert r.isolation == "process"
    for _ in range(2):  # the second step proves the pool was replenished
        res = _call(r)
        assert res.rewards.tolist() == [1.0, 1.0]        # only `ok` scored; the others are None, not 0
        assert res.metrics["reward/regex/timeouts"] == 1 and res.metrics["reward/busy/timeouts"] == 1
        assert res.metrics["reward/ok/timeouts"] == 0 and res.metrics["reward/ok/errors"] == 0
        assert math.isnan(res.components["regex"][0]) and math.isnan(res.components["busy"][1])
    assert r.totals["regex"]["timeouts"] == 2 and r.totals["busy"]["timeouts"] == 2
    pids = [int(x) for x in open(pidfile).read().split()]
    assert len(pids) == 4 and os.getpid() not in pids     # they ran in workers, not in this process
    for pid in pids:                                      # ... and every worker that ran them was killed
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
    assert len(reward_pool.worker_pids()) <= reward_pool.POOL_SIZE
    assert not [t.name for t in threading.enumerate() if t.name.startswith("reward-")]
    assert _spinning_children() == []


def test_thread_isolation_abandons_but_process_isolation_stops(hostile, tmp_path):
    """reward.isolation=thread is the in-process option: the timeout is honoured (the call returns None) but the
    busy loop's thread keeps running, which is why process is the default."""
    pidfile, stopfile = str(tmp_path / "pids"), tmp_path / "stop"
    r = Rewarder(RewardConfig(functions=[{"name": f"{hostile}:busy", "pidfile": pidfile, "stopfile": str(stopfile)},
                                         f"{hostile}:ok"], timeout_s=0.3, isolation="thread"))
    try:
        res = _call(r)
        assert res.rewards.tolist() == [1.0, 1.0] and res.metrics["reward/busy/timeouts"] == 1
        assert [int(x) for x in open(pidfile).read().split()] == [os.getpid()]
        spinning = [t for t in threading.enumerate() if t.name == "reward-busy"]
        assert spinning and spinning[0].is_alive()   # abandoned, still running: the limitation of isolation=thread
    finally:
        stopfile.write_text("")  # let the abandoned thread end, so the rest of the suite does not share a core with it
    spinning[0].join(10)


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_exit_interrupt_and_crash_are_contained(hostile, isolation, caplog):
    names = ["exit0", "interrupt", "ok"] + (["hard_exit"] if isolation == "process" else [])  # os._exit ends any
    r = Rewarder(RewardConfig(functions=[f"{hostile}:{n}" for n in names], timeout_s=5.0, isolation=isolation))
    for _ in range(2):  # after os._exit the pool has replaced its worker
        res = _call(r)
        assert res.rewards.tolist() == [1.0, 1.0]
        for n in names:
            assert res.metrics[f"reward/{n}/errors"] == (0 if n == "ok" else 1), n
    assert "called sys.exit(0)" in caplog.text and "KeyboardInterrupt" in caplog.text
    if isolation == "process":
        assert "worker process died (exit code 3)" in caplog.text


def test_exit_in_strict_mode_and_interrupt_without_isolation(hostile):
    with pytest.raises(RewardError, match=r"reward function 'exit0' raised: .*sys.exit\(0\)"):
        _call(Rewarder(RewardConfig(functions=[f"{hostile}:exit0"], strict=True)))
    r = Rewarder(RewardConfig(functions=[f"{hostile}:exit0", f"{hostile}:ok"], isolation="none"))
    assert _call(r).metrics["reward/exit0/errors"] == 1      # SystemExit contained even in-line
    with pytest.raises(KeyboardInterrupt):                    # in-line, it may be the user's Ctrl-C: it propagates
        _call(Rewarder(RewardConfig(functions=[f"{hostile}:interrupt"], isolation="none")))


@pytest.mark.parametrize("isolation", ["process", "none"])
def test_infinite_rewards_are_counted_and_skipped(hostile, isolation):
    r = Rewarder(RewardConfig(functions=[f"{hostile}:infs", f"{hostile}:ok"], weights=[1.0, 0.5],
                              isolation=isolation))
    res = r(prompts=["p"] * 4, completions=["a", "b", "c", "d"])
    comp = res.components["infs"].tolist()
    assert all(math.isnan(x) for x in comp[:3]) and comp[3] == 1.0
    assert res.metrics["reward/infs/nonfinite"] == 2                    # inf and -inf; NaN is "not applicable"
    assert res.rewards.tolist() == [0.5, 0.5, 0.5, 1.5]                 # 0.5 * ok (+ 1.0 where infs scored 1)
    assert math.isfinite(res.rewards.nanmean().item()) and res.rewards.nanmean().item() == pytest.approx(0.75)
    with pytest.raises(RewardError, match="returned inf"):
        Rewarder(RewardConfig(functions=[f"{hostile}:infs"], strict=True, isolation=isolation))(
            prompts=["p"] * 4, completions=["a", "b", "c", "d"])


@pytest.mark.parametrize("isolation", ["process", "thread", "none"])
def test_mutating_function_cannot_corrupt_the_batch(hostile, isolation):
    r = Rewarder(RewardConfig(functions=[f"{hostile}:mutate", f"{hostile}:intact"], isolation=isolation))
    prompts, completions, ids, answer = ["p0", "p1"], ["c0", "c1"], [[1, 2], [3]], ["1", "2"]
    res = r(prompts=prompts, completions=completions, completion_ids=ids, columns={"answer": answer})
    assert res.components["intact"].tolist() == [1.0, 1.0]            # the next function saw clean inputs
    assert (prompts, completions, ids, answer) == (["p0", "p1"], ["c0", "c1"], [[1, 2], [3]], ["1", "2"])


def _config(tmp_path, reward_spec, **extra):
    return load_config(tiny_overrides(tmp_path, **{"reward.functions": f"[{reward_spec}]"}, **extra))


@pytest.mark.parametrize("source,attr,match", [
    ("def f(completions:\n    return []\n", "f", "syntax error"),
    ("import not_a_module_rlkit_test\ndef f(completions, **kw):\n    return []\n", "f",
     "importing reward file .* failed: ModuleNotFoundError"),
    ("raise RuntimeError('no GPU here')\ndef f(completions, **kw):\n    return []\n", "f",
     "importing reward file .* failed: RuntimeError: no GPU here"),
    ("import sys\nsys.exit(0)\ndef f(completions, **kw):\n    return []\n", "f", "failed: SystemExit"),
    ("f = 3\n", "f", "is a int, not a function"),
])
def test_bad_reward_file_fails_validation(tmp_path, source, attr, match):
    path = tmp_path / "bad_reward.py"
    path.write_text(source)
    with pytest.raises(ConfigError, match=r"reward\.functions\[0\]: .*" + match) as e:
        _config(tmp_path, f"{path}:{attr}")
    assert "\n" not in str(e.value) and "bad_reward.py" in str(e.value)


def test_not_callable_module_attribute_fails_validation(tmp_path):
    with pytest.raises(ConfigError, match=r"reward\.functions\[0\]: 'math:pi' in module math is a float"):
        _config(tmp_path, "math:pi")


def test_cli_bad_reward_is_one_line_before_the_model_loads(tmp_path):
    path = tmp_path / "bad_reward.py"
    path.write_text("score = 0.5\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"),
                        *tiny_overrides(tmp_path, **{"reward.functions": f"[{path}:score]",
                                                     "model.name_or_path": str(tmp_path / "no_model_here")})],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr and len(lines) == 1, p.stderr
    assert lines[0].startswith("config error: reward.functions[0]: ") and "bad_reward.py" in lines[0]


@pytest.mark.timeout(300)
def test_tiny_run_survives_hostile_rewards(hostile, tmp_path, echo_rows):
    """toy:tiny, 2 steps, with a reward that calls sys.exit(0), one that hangs in a catastrophic regex and one
    that returns ±inf: training finishes, each fault is counted every step, reward/mean stays finite."""
    from rlkit.trainer import Trainer

    spec = f"{REPO / 'rewards' / 'toy.py'}:echo,{hostile}:exit0,{hostile}:regex,{hostile}:infs"
    cfg = _config(tmp_path, spec, **{"reward.timeout_s": 1.0, "reward.weights": "[1.0,0.0,0.0,0.0]",
                                     "trainer.total_steps": 2})
    trainer = Trainer(cfg, train_rows=echo_rows)
    trainer.train()
    rows = read_metrics(trainer.run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["reward/exit0/errors"] == 1 and row["reward/regex/timeouts"] == 1
        assert row["reward/infs/nonfinite"] == 8          # 16 samples, values cycle inf, -inf, nan, 1.0
        assert row["reward/mean"] is not None and math.isfinite(row["reward/mean"])
    assert _spinning_children() == []
