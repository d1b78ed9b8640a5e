"""Command-line entry points."""
import subprocess
import sys

from tests.conftest import REPO


def test_plugins_lists_every_hook():
    p = subprocess.run([sys.executable, "-m", "rlkit", "plugins"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for hook, names in {
        "advantage": ["grpo", "rloo", "reinforce_pp", "gae"],
        "policy_loss": ["ppo_clip", "gspo"],
        "aggregation": ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"],
        "kl": ["k1", "k2", "k3"],
        "regularizer": ["entropy_bonus"],
        "experience_filter": ["dapo_dynamic_sampling"],
        "prompt_selector": ["uniform"],
        "rollout_strategy": ["single"],
        "rollout_engine": ["hf"],
        "reward": ["gsm8k_strict", "gsm8k_flexible", "math_verify", "format_gsm8k", "length_penalty"],
    }.items():
        section = out.split(f"\n{hook}:")[1] if f"\n{hook}:" in out else out.split(f"{hook}:")[1]
        section = section.split("\n\n")[0]
        for n in names:
            assert f"  {n} " in section or f"  {n}\n" in section, (hook, n)


def test_bad_config_fails_before_model_load():
    p = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), f"recipe={REPO}/recipes/quickstart.yaml",
                        "algorithm.advantage=grop"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode != 0
    assert "algorithm.advantage" in p.stderr and "Did you mean: grpo" in p.stderr
    assert "Loading weights" not in p.stderr


def test_missing_model_names_the_key(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), f"recipe={REPO}/recipes/quickstart.yaml",
                        f"model.name_or_path={tmp_path}/no-such-model", f"trainer.output_dir={tmp_path}"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode != 0
    assert "model.name_or_path" in p.stderr and "no-such-model" in p.stderr and "Traceback" not in p.stderr
