"""Config loading: recipes, overrides, profiles, and errors that name the key."""
import pytest

from rlkit.config import ConfigError, load_config, to_dict


def cfg(*args):
    return load_config(["model.name_or_path=toy:tiny", "reward.functions=[gsm8k_strict]", *args])


def test_overrides_types_and_plugins():
    c = cfg("trainer.lr=1e-6", "algorithm.advantage=rloo", "algorithm.policy_loss.eps_high=0.28", "rollout.stop=[\"\\n\\n\"]")
    assert c.trainer.lr == 1e-6 and isinstance(c.trainer.lr, float)
    assert c.algorithm.advantage.name == "rloo"
    assert c.algorithm.policy_loss.name == "ppo_clip" and c.algorithm.policy_loss.args == {"eps_high": 0.28}
    assert c.rollout.stop == ["\n\n"]


def test_plugin_name_change_resets_params():
    c = cfg("algorithm.advantage.scale_by_std=false", "algorithm.advantage=rloo")
    assert c.algorithm.advantage.name == "rloo" and c.algorithm.advantage.args == {}


def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match=r"trainer\.lrr.*Did you mean: lr"):
        cfg("trainer.lrr=1e-6")


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"trainer\.total_steps: expected an integer"):
        cfg("trainer.total_steps=ten")


def test_unknown_plugin_suggests():
    with pytest.raises(ConfigError, match=r"algorithm\.advantage.*Did you mean: grpo"):
        cfg("algorithm.advantage=grop")


def test_bad_plugin_param_names_key():
    with pytest.raises(ConfigError, match=r"algorithm\.advantage\.scale_by_sdt.*scale_by_std"):
        cfg("algorithm.advantage.scale_by_sdt=false")
    with pytest.raises(ConfigError, match=r"algorithm\.advantage\.scale_by_std: expected true/false"):
        cfg("algorithm.advantage.scale_by_std=maybe")


def test_unknown_reward_names_index():
    with pytest.raises(ConfigError, match=r"reward\.functions\[0\]"):
        load_config(["model.name_or_path=toy:tiny", "reward.functions=[gsm8k_strcit]"])


def test_recipe_profile_and_inherit(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model: {name_or_path: toy:tiny}\nreward: {functions: [gsm8k_strict]}\ntrainer: {lr: 1.0e-5, total_steps: 50}\n")
    r = tmp_path / "r.yaml"
    r.write_text("inherit: base.yaml\ntrainer: {total_steps: 100}\nprofiles:\n  tiny: {trainer.total_steps: 3, rollout.max_new_tokens: 4}\n")
    c = load_config([f"recipe={r}"])
    assert (c.trainer.lr, c.trainer.total_steps) == (1e-5, 100)
    c = load_config([f"recipe={r}", "profile=tiny", "trainer.lr=2e-6"])
    assert (c.trainer.lr, c.trainer.total_steps, c.rollout.max_new_tokens) == (2e-6, 3, 4)
    with pytest.raises(ConfigError, match="Unknown profile 'tinny'.*tiny"):
        load_config([f"recipe={r}", "profile=tinny"])
    assert to_dict(c)["trainer"]["total_steps"] == 3


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="Recipe file not found: nope.yaml"):
        load_config(["recipe=nope.yaml"])


def test_every_shipped_recipe_validates():
    import glob

    from tests.conftest import REPO

    recipes = sorted(glob.glob(str(REPO / "recipes" / "*.yaml")))
    assert recipes
    for r in recipes:
        c = load_config([f"recipe={r}"])
        assert c.model.name_or_path
