"""User experience (issue 13, items 1-8): out-of-tree plugins (``imports:``, the ``rlkit.plugins`` entry-point
group), ``plugins NAME``, help / ``--print-config`` / unknown commands, one-line ``rlkit eval`` errors, progress
and console lines, and eval results named by dataset and settings, written into the run."""
import json
import shutil
import sys

import pytest
import yaml

from rlkit.config import ConfigError, load_config
from tests.conftest import REPO, read_metrics, tiny_overrides

PLUGIN = '''
"""Test plugin, not a method: a constant advantage, to see that an out-of-tree plugin is the one used."""
from dataclasses import dataclass

from rlkit.plugins import AdvantageEstimator
from rlkit.registry import register_advantage, register_reward


@register_advantage("ux_const_adv")
class ConstAdv(AdvantageEstimator):
    @dataclass
    class Params:
        value: float = 1.0          # the advantage of every response token

    def __call__(self, batch):
        batch.advantages = self.params.value * batch.response_mask
        batch.returns = batch.advantages


@register_reward("ux_const_reward")
def const_reward(completions, **kwargs):
    return [0.25 for _ in completions]
'''


def test_plugin_from_a_file_outside_the_repo_trains(tmp_path, echo_rows, capsys):
    """``imports: [my_adv.py]`` (relative to the recipe) registers an advantage and a reward that the run then
    uses: every token's advantage is the plugin's param, every reward the function's constant.  Also: with a progress bar asked for but output not a terminal
    (pytest captures it), each step prints one short line and no tqdm frame is drawn."""
    from rlkit.trainer import Trainer

    d = tmp_path / "elsewhere"
    d.mkdir()
    (d / "my_adv.py").write_text(PLUGIN)
    (d / "r.yaml").write_text("imports: [my_adv.py]\nalgorithm:\n  advantage: {name: ux_const_adv, value: 0.375}\n")
    cfg = load_config([f"recipe={d / 'r.yaml'}", *tiny_overrides(tmp_path / "out", **{
        "trainer.total_steps": 2, "trainer.progress_bar": True, "reward.functions": "[ux_const_reward]"})])
    assert cfg.imports == [str(d / "my_adv.py")] and cfg.algorithm.advantage.args == {"value": 0.375}
    trainer = Trainer(cfg, train_rows=echo_rows)
    trainer.train()
    rows = read_metrics(trainer.run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["advantage/mean"] == pytest.approx(0.375) and r["advantage/min"] == r["advantage/max"] == pytest.approx(0.375)
        assert r["reward/mean"] == pytest.approx(0.25)       # the reward registered by the same file (reward workers)
    out, err = capsys.readouterr()
    lines = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert [ln.split(":")[0] for ln in lines] == ["step 1/2", "step 2/2"] and "reward/mean=" in lines[0]
    assert "rlkit:" not in err                                  # no frame of the step bar (desc "rlkit")


def test_import_errors_are_one_line(tmp_path):
    base = ["model.name_or_path=toy:tiny", "reward.functions=[gsm8k_strict]"]
    with pytest.raises(ConfigError, match=r"^imports\[0\]: cannot import 'no_such_module_xyz': ModuleNotFoundError"):
        load_config(base + ["imports=[no_such_module_xyz]"])
    with pytest.raises(ConfigError, match=r"^imports\[1\]: file not found: 'nope/x.py'"):
        load_config(base + ["imports=[json, nope/x.py]"])
    bad = tmp_path / "bad.py"
    bad.write_text("def broken(:\n")
    with pytest.raises(ConfigError, match=r"^imports\[0\]: cannot import .*bad\.py'?: SyntaxError.*\(line 1\)$"):
        load_config(base + [f"imports=[{bad}]"])


def test_entry_point_group_registers_and_reports(tmp_path, monkeypatch):
    from rlkit import registry

    monkeypatch.setattr(registry, "_entry_point_error", "")
    site = tmp_path / "site"
    site.mkdir()
    (site / "uxep_mod.py").write_text(PLUGIN.replace("ux_const_adv", "ux_ep_adv"))
    dist = site / "uxep-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: uxep\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rlkit.plugins]\nuxep = uxep_mod\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "_loaded", False)           # as at start-up: the first lookup loads entry points
    assert "ux_ep_adv" in registry.ADVANTAGES
    c = load_config(["model.name_or_path=toy:tiny", "reward.functions=[gsm8k_strict]", "algorithm.advantage=ux_ep_adv"])
    assert c.algorithm.advantage.name == "ux_ep_adv"

    bad = tmp_path / "site2" / "uxbad-0.1.dist-info"
    bad.mkdir(parents=True)
    (bad / "METADATA").write_text("Metadata-Version: 2.1\nName: uxbad\nVersion: 0.1\n")
    (bad / "entry_points.txt").write_text("[rlkit.plugins]\nbroken = uxbad_missing_module\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site2"))
    monkeypatch.setattr(registry, "_loaded", False)
    with pytest.raises(ConfigError, match=r"^entry point 'rlkit.plugins' 'broken = uxbad_missing_module' failed to load: "
                                          r"ModuleNotFoundError: No module named 'uxbad_missing_module'$"):
        load_config(["model.name_or_path=toy:tiny", "reward.functions=[gsm8k_strict]"])
    with pytest.raises(registry.PluginError, match=r"'broken = uxbad_missing_module'"):   # on every later lookup too
        registry.ADVANTAGES.get("grpo")


def test_plugins_name_prints_params(capsys):
    from rlkit.__main__ import main

    main(["plugins", "grpo"])
    out = capsys.readouterr().out
    assert "advantage plugin 'grpo'" in out and "DeepSeekMath" in out               # the class docstring
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("scale_by_std"))
    assert "bool" in line and "default True" in line and "False = Dr.GRPO" in line  # type, default, doc
    assert "Literal['group', 'batch']" in out
    main(["plugins", "ppo_clip"])
    assert "dual_clip" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["plugins", "grop"])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown plugin 'grop'" in err and "Did you mean: grpo" in err


def test_help_print_config_and_unknown_command(tmp_path, capsys):
    from rlkit.__main__ import COMMANDS, main

    main(["train", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--print-config" in out and "profile=" in out
    main(["eval", "--help"])
    assert capsys.readouterr().out.startswith("usage: python -m rlkit eval")
    main(["train", "recipe=recipes/grpo_math.yaml", "profile=tiny", "trainer.run_name=0123",
          f"trainer.output_dir={tmp_path}", "--print-config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["run_name"] == "0123" and cfg["trainer"]["mixed_precision"] == "no"
    assert cfg["algorithm"]["advantage"] == {"name": "grpo", "scale_by_std": False}
    assert list(tmp_path.iterdir()) == []                                             # nothing ran
    with pytest.raises(SystemExit) as e:
        main(["nope"])
    names = [c.split()[0] for c in COMMANDS if not c.startswith("   ")]
    assert {"plugins", "train", "eval", "report"} <= set(names)
    assert all(n in str(e.value) for n in names)
    import runpy

    old_argv = sys.argv
    sys.argv = [str(REPO / "launch" / "train.py"), "--help"]                # the launcher script, as a user runs it
    try:
        runpy.run_path(str(REPO / "launch" / "train.py"), run_name="__main__")   # returns: exit status 0
    finally:
        sys.argv = old_argv
    assert capsys.readouterr().out.startswith("usage: python launch/train.py")


def _eval(capsys, *args):
    """``python -m rlkit eval`` in-process: (exit code, stdout, stderr)."""
    from rlkit.__main__ import main

    try:
        main(["eval", *args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_errors_are_one_line(tmp_path, toy_model_dir, capsys):
    common = [f"recipe={REPO}/recipes/quickstart.yaml"]
    for args, msg in [
        ([f"model={tmp_path}/no/such/model"], "no such model directory"),
        ([f"model={toy_model_dir}", "eval.samples_per_prmpt=2"], "Unknown config key 'eval.samples_per_prmpt'"),
        ([f"modle={toy_model_dir}"], "did you mean model="),
        ([f"model={toy_model_dir}", f"data.eval_path={tmp_path}/missing.jsonl"], "missing.jsonl"),
        ([f"model={tmp_path}"], "cannot load the tokenizer"),               # a directory without a model
    ]:
        code, out, err = _eval(capsys, *common, *args)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and "Traceback" not in err, (args, err[-2000:])
        assert msg in lines[-1] and " error: " in lines[-1], (args, lines)


def test_eval_results_named_by_dataset_and_settings(tmp_path, toy_model_dir, capsys):
    run = tmp_path / "run"
    model = run / "checkpoints" / "step_3" / "model"
    shutil.copytree(toy_model_dir, model)
    before = sorted(p.name for p in model.iterdir())
    rows = (REPO / "recipes" / "data" / "echo_test.jsonl").read_text().splitlines()[:4]
    for name in ("gsm8k", "math500"):                                  # two datasets, both named test.jsonl
        (tmp_path / name).mkdir()
        (tmp_path / name / "test.jsonl").write_text("\n".join(rows) + "\n")
    common = [f"model={model}", f"recipe={REPO}/recipes/quickstart.yaml", f"reward.functions=[{REPO}/rewards/toy.py:echo]",
              f"data.path={REPO}/recipes/data/echo_train.jsonl", "eval.samples_per_prompt=2", "rollout.max_new_tokens=4",
              "rollout.samples_per_generate_call=4", "trainer.progress_bar=false"]
    written = []
    for extra in ([f"data.eval_path={tmp_path}/gsm8k/test.jsonl"], [f"data.eval_path={tmp_path}/math500/test.jsonl"],
                  [f"data.eval_path={tmp_path}/gsm8k/test.jsonl", "eval.temperature=0.7"],
                  [f"data.eval_path={tmp_path}/gsm8k/test.jsonl", "--output_dir", str(tmp_path / "out")]):
        code, out, err = _eval(capsys, *common, *extra)
        assert code == 0, err[-3000:]
        written.append(out.strip().splitlines()[-1].split("wrote ", 1)[1])
        progress = [ln for ln in out.splitlines() if ln.startswith("eval ")]
        assert [ln.split(" (")[0] for ln in progress] == [f"eval {extra[0].split('/')[-2]}_test: {k}/4 prompts" for k in (2, 4)]
    assert sorted(p.name for p in model.iterdir()) == before                   # nothing written into the model
    in_run = sorted((run / "eval" / "step_3").iterdir())
    assert len(in_run) == 3 and sorted(map(str, in_run)) == sorted(written[:3])
    gsm = [p.name for p in in_run if p.name.startswith("gsm8k_test__")]
    assert len(gsm) == 2 and any("_t0.7_" in n for n in gsm) and any("_t0_" in n for n in gsm)
    assert any(p.name.startswith("math500_test__gsm8k_n2_t0_p64_len4_") for p in in_run)
    assert written[3].startswith(str(tmp_path / "out") + "/gsm8k_test__") and written[3].endswith(".json")
    rec = json.loads(open(written[0]).read())
    assert rec["step"] == 3 and rec["model"] == str(model) and rec["results"]["num_prompts"] == 4
    from rlkit.report import checkpoint_evals

    assert sorted(t for _, t, _ in checkpoint_evals(str(run))) == sorted(p.name[:-5] for p in in_run)
