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


def test_plugin_name_change_resets_params(caplog):
    c = cfg("algorithm.advantage.scale_by_std=false", "algorithm.advantage=rloo")
    assert c.algorithm.advantage.name == "rloo" and c.algorithm.advantage.args == {}
    assert "grpo -> rloo" in caplog.text and "dropped grpo's scale_by_std=False" in caplog.text


def test_same_plugin_name_keeps_params_other_name_warns(caplog):
    """Issue 13.7: ``algorithm.advantage=grpo`` on grpo_math (Dr.GRPO, ``scale_by_std: false``) keeps it; a different
    plugin starts from its own defaults (GSPO must not inherit ppo_clip's 0.28 clip range) and the drop is named."""
    from tests.conftest import REPO

    c = load_config([f"recipe={REPO}/recipes/grpo_math.yaml", "algorithm.advantage=grpo", "algorithm.advantage.eps=0.0001"])
    assert c.algorithm.advantage.args == {"scale_by_std": False, "eps": 1e-4}
    c = load_config([f"recipe={REPO}/recipes/grpo_math.yaml", "algorithm.advantage={name: grpo, std_scope: batch}"])
    assert c.algorithm.advantage.args == {"scale_by_std": False, "std_scope": "batch"}
    assert "drop" not in caplog.text
    c = load_config([f"recipe={REPO}/recipes/grpo_d3s.yaml", "algorithm.policy_loss=gspo"])
    assert c.algorithm.policy_loss.name == "gspo" and c.algorithm.policy_loss.args == {}
    assert "algorithm.policy_loss: ppo_clip -> gspo" in caplog.text and "eps_low=0.2, eps_high=0.28" in caplog.text
    c = load_config([f"recipe={REPO}/recipes/grpo_d3s.yaml", "algorithm.policy_loss={name: gspo, eps_high: 5.0e-4}"])
    assert c.algorithm.policy_loss.args == {"eps_high": 5e-4}


def test_str_and_literal_values_keep_their_text(tmp_path):
    """Issue 13.6: values are read by the field's declared type (YAML 1.1 would give 83, False, a mapping)."""
    c = cfg("trainer.run_name=0123", "trainer.mixed_precision=no", "data.template=Q: {prompt}", "data.prompt_field=on",
            "rollout.stop=[no, '#### ']", "model.lora.target_modules=on", "data.system_prompt=yes")
    assert (c.trainer.run_name, c.trainer.mixed_precision, c.data.template) == ("0123", "no", "Q: {prompt}")
    assert (c.data.prompt_field, c.rollout.stop, c.model.lora.target_modules, c.data.system_prompt) == ("on", ["no", "#### "], "on", "yes")
    c = cfg("trainer.run_name=on", "trainer.lr=1e-6", "trainer.total_steps=7", "model.tokenizer=null",
            "model.lora.target_modules=[q_proj, v_proj]", "trainer.run_name='0x10'", "algorithm.tis_cap=2")
    assert (c.trainer.run_name, c.trainer.lr, c.trainer.total_steps, c.model.tokenizer) == ("0x10", 1e-6, 7, None)
    assert c.model.lora.target_modules == ["q_proj", "v_proj"] and c.algorithm.tis_cap == 2.0
    with pytest.raises(ConfigError, match=r"trainer\.mixed_precision: must be one of \['no', 'bf16', 'fp16'\], got 'off'"):
        cfg("trainer.mixed_precision=off")
    r = tmp_path / "r.yaml"
    r.write_text("model: {name_or_path: toy:tiny}\nreward: {functions: [gsm8k_strict]}\n"
                 "trainer: {run_name: 0123, mixed_precision: no, resume: none, seed: 17}\n"
                 "data: {template: '{prompt} on', system_prompt: off, prompt_field: 1e3}\n"
                 "algorithm: {prompt_selector: {name: dump, source_field: 0123}}\n"
                 "profiles: {p: {trainer.run_name: 007, data.answer_field: null}}\n")
    c = load_config([f"recipe={r}"], validate=False)
    assert (c.trainer.run_name, c.trainer.mixed_precision, c.trainer.resume, c.trainer.seed) == ("0123", "no", "none", 17)
    assert (c.data.template, c.data.system_prompt, c.data.prompt_field) == ("{prompt} on", "off", "1e3")
    spec = c.algorithm.prompt_selector
    assert spec.args == {"source_field": 83}                         # the untyped view: YAML's reading ...
    from rlkit.config import make_params
    from rlkit.registry import PROMPT_SELECTORS

    assert make_params(PROMPT_SELECTORS.get("dump"), spec, "p").source_field == "0123"   # ... the str param: the text
    assert spec.args == {"source_field": "0123"}                     # and the spec (config.yaml) says so after it
    c = load_config([f"recipe={r}", "profile=p"], validate=False)
    assert (c.trainer.run_name, c.data.answer_field) == ("007", None)


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
