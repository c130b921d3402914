"""protocol.config: the typed RunConfig, its YAML / command-line loader and the argparse integration."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.config import (
    ConfigArgumentParser,
    ConfigError,
    RunConfig,
    absolute_flags,
    add_config_arguments,
    check_inputs,
    config_from_args,
    config_from_dict,
    config_to_dict,
    load_config,
    path_fields,
)

REPO = Path(__file__).resolve().parents[2]


def leaf_fields(obj=None, prefix: str = ""):
    """(dotted key, default value, field) for every leaf field of RunConfig, recursively."""
    obj = RunConfig() if obj is None else obj
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaf_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, f


def write_yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="test-prog")
    add_config_arguments(parser)
    return parser


# --------------------------------------------------------------------------- defaults and sources


def test_defaults_validate():
    cfg = RunConfig()
    assert cfg.validate() is cfg
    assert load_config() == RunConfig()
    assert cfg.train.lr == 1e-4 and cfg.rollout.stop_token_ids == [] and cfg.output.progress is True
    assert not cfg.uses_critic


def test_mutable_defaults_are_not_shared():
    a, b = RunConfig(), RunConfig()
    a.rollout.stop_token_ids.append(5)
    a.model.lora_target_modules.append("gate_proj")
    assert b.rollout.stop_token_ids == []
    assert "gate_proj" not in b.model.lora_target_modules


def test_yaml_then_overrides_applied_in_order(tmp_path):
    path = write_yaml(tmp_path, """
run_id: from-file
train:
  lr: 1e-4
  num_steps: 7
  max_staleness: 3
rollout:
  temperature: 1  # an int where a float is expected is fine
  stop_token_ids: [5, 6]
algo:
  advantage_estimator: gae
output:
  progress: no
""")
    cfg = load_config(path, {"train.num_steps": "9", "rollout.top_p": "0.5", "run_id": "from-cli"})
    assert cfg.run_id == "from-cli"
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.num_steps == 9  # the command line wins over the file
    assert cfg.train.max_staleness == 3  # file value kept
    assert cfg.rollout.temperature == 1.0 and isinstance(cfg.rollout.temperature, float)
    assert cfg.rollout.top_p == 0.5
    assert cfg.rollout.stop_token_ids == [5, 6]
    assert cfg.output.progress is False
    assert cfg.uses_critic
    # untouched fields keep their defaults
    assert cfg.train.ppo_epochs == RunConfig().train.ppo_epochs


@pytest.mark.parametrize("text", ["1e-4", "1.0e-4", "1E-4", "0.0001", "+1e-4"])
def test_yaml_scientific_floats_accepted(tmp_path, text):
    # YAML 1.1 reads `1e-4` (no dot) as a string: the loader must still take it as a float
    cfg = load_config(write_yaml(tmp_path, f"train:\n  lr: {text}\ncritic:\n  lr: {text}\n"))
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.critic.lr == pytest.approx(1e-4)


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, "")) == RunConfig()
    assert load_config(write_yaml(tmp_path, "# only a comment\n")) == RunConfig()


def test_missing_file_invalid_yaml_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write_yaml(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(write_yaml(tmp_path, "- a\n- b\n"))


def test_dict_round_trip():
    cfg = load_config(overrides={"train.lr": "0.003", "rollout.stop_token_ids": "[1, 2]", "algo.dual_clip": "3"})
    data = config_to_dict(cfg)
    json.dumps(data)  # plain JSON-able values
    assert config_from_dict(data) == cfg
    assert config_from_dict(json.loads(json.dumps(data))) == cfg


def test_a_recorded_config_from_before_the_reward_lists_still_loads():
    """Replays of recordings made when reward.function was one string with one reward.function_weight."""
    old = config_to_dict(RunConfig())
    old["reward"] = {**old["reward"], "function": "pkg.mod:f", "function_weight": 0.5}
    del old["reward"]["function_weights"]
    reward = config_from_dict(old).reward
    assert (reward.function, reward.function_weights) == (["pkg.mod:f"], [0.5])
    old["reward"].update(function="", function_weight=1.0)  # no function: no weight for it
    assert config_from_dict(old).reward == RunConfig().reward


# --------------------------------------------------------------------------- unknown keys / wrong types


def test_unknown_top_level_key_names_key_and_file(tmp_path):
    path = write_yaml(tmp_path, "trian:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert "'trian'" in msg and str(path) in msg and "file" in msg
    assert "train" in msg  # lists the known keys


def test_unknown_key_in_section_names_key_and_file(tmp_path):
    path = write_yaml(tmp_path, "train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert "'train.learning_rate'" in msg and str(path) in msg
    assert "lr" in msg and "num_steps" in msg  # the known keys of that section


def test_unknown_key_from_overrides_names_command_line():
    with pytest.raises(ConfigError) as exc:
        load_config(overrides={"train.bogus": "1"})
    assert "'train.bogus'" in str(exc.value) and "command line" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config(overrides={"nosection.key": "1"})
    assert "'nosection'" in str(exc.value) and "command line" in str(exc.value)


def test_section_given_a_scalar_is_an_error(tmp_path):
    path = write_yaml(tmp_path, "train: 3\n")
    with pytest.raises(ConfigError, match=r"'train' is a section") as exc:
        load_config(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("train:\n  num_steps: abc\n", "train.num_steps"),  # str for int
        ("train:\n  num_steps: '12x'\n", "train.num_steps"),
        ("train:\n  num_steps: true\n", "train.num_steps"),  # bool for int
        ("train:\n  num_steps: 2.5\n", "train.num_steps"),  # float for int
        ("train:\n  num_steps: 1e2\n", "train.num_steps"),
        ("train:\n  lr: true\n", "train.lr"),  # bool for float
        ("train:\n  lr: fast\n", "train.lr"),
        ("train:\n  lr: [1, 2]\n", "train.lr"),
        ("model:\n  path: [a, b]\n", "model.path"),  # list for str
        ("model:\n  path: 3\n", "model.path"),  # int for str
        ("model:\n  path: {a: 1}\n", "model.path"),  # mapping for str
        ("output:\n  progress: 1\n", "output.progress"),  # int for bool
        ("output:\n  progress: maybe\n", "output.progress"),
        ("rollout:\n  stop_token_ids: 3\n", "rollout.stop_token_ids"),  # int for list
        ("rollout:\n  stop_token_ids: {a: 1}\n", "rollout.stop_token_ids"),
        ("run_id: 5\n", "run_id"),
    ],
)
def test_wrong_type_from_file(tmp_path, yaml_text, key):
    path = write_yaml(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert key in str(exc.value) and str(path) in str(exc.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train.num_steps", "abc"),
        ("train.num_steps", "2.5"),
        ("train.num_steps", True),
        ("train.lr", "fast"),
        ("train.lr", False),
        ("model.path", ["a"]),
        ("model.path", 3),
        ("output.progress", "maybe"),
        ("output.progress", 1),
    ],
)
def test_wrong_type_from_command_line(key, value):
    with pytest.raises(ConfigError) as exc:
        load_config(overrides={key: value})
    assert key in str(exc.value) and "command line" in str(exc.value)


@pytest.mark.parametrize("text,expected", [("true", True), ("False", False), ("yes", True), ("no", False),
                                           ("1", True), ("0", False)])
def test_bool_strings(text, expected):
    assert load_config(overrides={"output.progress": text}).output.progress is expected


@pytest.mark.parametrize("text,expected", [("[3,4]", [3, 4]), ("[3, 4]", [3, 4]), ("7", [7]), ("[]", []), ("", []),
                                           ("3,4", [3, 4]), ("3, 4", [3, 4])])
def test_list_strings(text, expected):
    assert load_config(overrides={"rollout.stop_token_ids": text}).rollout.stop_token_ids == expected


# --------------------------------------------------------------------------- choices and cross-field checks


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model.dtype", "float64"),
        ("model.attn_implementation", "flash"),
        ("algo.advantage_estimator", "ppo"),
        ("algo.kl_estimator", "k4"),
        ("algo.tis_level", "none"),
        ("data.apply_chat_template", "true"),
        ("rollout.engine_dtype", "int8"),
        ("train.zero_stage", "4"),
    ],
)
def test_choices_enforced(key, value):
    with pytest.raises(ConfigError) as exc:
        load_config(overrides={key: value})
    assert key in str(exc.value) and "must be one of" in str(exc.value)


# choices that validate only together with another option's value (refused alone, with a message)
COMPANIONS = {("algo.tis_level", "sequence_geometric"): {"algo.tis_mode": "mask"},
              ("algo.policy_loss", "gspo"): {"algo.loss_aggregation": "seq_mean_token_mean"}}


def test_choices_accepted():
    for key, value, f in leaf_fields():
        for choice in f.metadata.get("choices") or ():
            cfg = load_config(overrides={key: str(choice), **COMPANIONS.get((key, choice), {})})
            section, name = key.split(".")
            assert getattr(getattr(cfg, section), name) == choice


def test_choices_checked_by_validate_on_direct_assignment():
    cfg = RunConfig()
    cfg.algo.kl_mode = "both"
    with pytest.raises(ConfigError, match="algo.kl_mode"):
        cfg.validate()


def test_prompts_per_step_multiple_of_prompts_per_grant():
    load_config(overrides={"train.prompts_per_step": "24", "rollout.prompts_per_grant": "8"})
    load_config(overrides={"train.prompts_per_step": "5", "rollout.prompts_per_grant": "5"})
    with pytest.raises(ConfigError) as exc:
        load_config(overrides={"train.prompts_per_step": "20", "rollout.prompts_per_grant": "8"})
    assert "train.prompts_per_step" in str(exc.value) and "rollout.prompts_per_grant" in str(exc.value)


@pytest.mark.parametrize("value", ["0", "-0.5"])
def test_temperature_must_be_positive(value):
    with pytest.raises(ConfigError, match="rollout.temperature"):
        load_config(overrides={"rollout.temperature": value})
    assert load_config(overrides={"rollout.temperature": "0.01"}).rollout.temperature == 0.01


@pytest.mark.parametrize("value", ["0", "-0.1", "1.01", "nan"])
def test_top_p_range(value):
    with pytest.raises(ConfigError, match="rollout.top_p"):
        load_config(overrides={"rollout.top_p": value})


@pytest.mark.parametrize("value", ["0", "-1"])
def test_min_rollouts_at_least_one(value):
    with pytest.raises(ConfigError, match="transport.min_rollouts must be >= 1"):
        load_config(overrides={"transport.min_rollouts": value})


@pytest.mark.parametrize("value", ["1", "0.001", "0.5"])
def test_top_p_accepted(value):
    assert load_config(overrides={"rollout.top_p": value}).rollout.top_p == float(value)


@pytest.mark.parametrize("value", ["0.5", "1", "1.0", "-2"])
def test_dual_clip_rejected(value):
    with pytest.raises(ConfigError, match="algo.dual_clip"):
        load_config(overrides={"algo.dual_clip": value})


@pytest.mark.parametrize("value", ["0", "1.5", "3"])
def test_dual_clip_accepted(value):
    assert load_config(overrides={"algo.dual_clip": value}).algo.dual_clip == float(value)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_gamma_other_than_one_rejected_for_group_estimators(estimator):
    with pytest.raises(ConfigError, match=rf"algo\.gamma .*algo\.advantage_estimator '{estimator}'"):
        load_config(overrides={"algo.advantage_estimator": estimator, "algo.gamma": "0.99"})
    assert load_config(overrides={"algo.advantage_estimator": estimator, "algo.gamma": "1"}).algo.gamma == 1.0


@pytest.mark.parametrize("estimator", ["gae", "reinforce_pp", "reinforce_pp_baseline"])
def test_gamma_accepted_for_estimators_that_discount(estimator):
    cfg = load_config(overrides={"algo.advantage_estimator": estimator, "algo.gamma": "0.99"})
    assert cfg.algo.gamma == 0.99


@pytest.mark.parametrize("value", ["0", "-10", "nan"])
def test_kl_clamp_must_be_positive(value):
    with pytest.raises(ConfigError, match=r"algo\.kl_clamp must be > 0"):
        load_config(overrides={"algo.kl_clamp": value})


def test_kl_clamp_default_and_accepted():
    assert RunConfig().algo.kl_clamp == 10.0
    assert load_config(overrides={"algo.kl_clamp": "2.5"}).algo.kl_clamp == 2.5


def test_lr_schedule_defaults_keep_a_constant_rate_without_warmup():
    train = RunConfig().train
    assert (train.lr_schedule, train.lr_warmup_steps, train.lr_warmup_ratio, train.min_lr_ratio) == \
        ("constant", 0, 0.0, 0.0)
    assert train.warmup_steps == 0


def test_lr_warmup_ratio_rounds_up_to_whole_steps():
    cfg = load_config(overrides={"train.num_steps": "150", "train.lr_warmup_ratio": "0.03"})
    assert cfg.train.warmup_steps == 5  # 4.5 steps, rounded up
    assert load_config(overrides={"train.lr_warmup_steps": "7"}).train.warmup_steps == 7


@pytest.mark.parametrize(("overrides", "message"), [
    ({"train.lr_warmup_steps": "2", "train.lr_warmup_ratio": "0.1"},
     r"train\.lr_warmup_steps \(2\) and train\.lr_warmup_ratio \(0\.1\) both set the warm-up"),
    ({"train.min_lr_ratio": "0.1"}, r"train\.min_lr_ratio \(0\.1\) .*train\.lr_schedule is 'constant'"),
    ({"train.lr_warmup_steps": "41"}, r"train\.lr_warmup_steps \(41\) is longer than train\.num_steps \(40\)"),
    ({"train.lr_warmup_steps": "-1"}, r"train\.lr_warmup_steps must be >= 0"),
    ({"train.lr_warmup_ratio": "1.5"}, r"train\.lr_warmup_ratio must be in \[0, 1\]"),
    ({"train.lr_schedule": "cosine", "train.min_lr_ratio": "2"}, r"train\.min_lr_ratio must be in \[0, 1\]"),
])
def test_lr_schedule_refuses_nonsense(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_lr_schedule_accepts_decay_to_a_floor_after_warmup():
    cfg = load_config(overrides={"train.lr_schedule": "cosine", "train.min_lr_ratio": "0.1",
                                 "train.lr_warmup_ratio": "0.05"})
    assert (cfg.train.lr_schedule, cfg.train.min_lr_ratio, cfg.train.warmup_steps) == ("cosine", 0.1, 2)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"algo.tis_floor": "2", "algo.tis_cap": "2"}, r"algo\.tis_floor \(2\.0\) and algo\.tis_cap \(2\.0\)"),
    ({"algo.tis_floor": "-0.5"}, r"algo\.tis_floor \(-0\.5\) and algo\.tis_cap"),
    ({"algo.tis_floor": "0.5", "algo.tis_level": "off"}, r"algo\.tis_floor \(0\.5\) .*algo\.tis_level is 'off'"),
    ({"algo.tis_level": "sequence_geometric"}, r"algo\.tis_level 'sequence_geometric' .*algo\.tis_mode mask"),
])
def test_importance_sampling_refuses_nonsense(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_gspo_needs_its_per_sequence_aggregation():
    with pytest.raises(ConfigError, match=r"algo\.policy_loss 'gspo' .*algo\.loss_aggregation seq_mean_token_mean "
                                          r"\(got 'token_mean'\)"):
        load_config(overrides={"algo.policy_loss": "gspo"})
    cfg = load_config(overrides={"algo.policy_loss": "gspo", "algo.loss_aggregation": "seq_mean_token_mean",
                                 "algo.clip_low": "3e-4", "algo.clip_high": "4e-4"})
    assert (cfg.algo.policy_loss, cfg.algo.clip_low, cfg.algo.clip_high) == ("gspo", 3e-4, 4e-4)
    assert RunConfig().algo.policy_loss == "ppo"


def test_min_new_tokens_lies_between_0_and_max_new_tokens():
    assert RunConfig().rollout.min_new_tokens == 0
    cfg = load_config(overrides={"rollout.max_new_tokens": "16", "rollout.min_new_tokens": "16"})
    assert (cfg.rollout.min_new_tokens, cfg.rollout.max_new_tokens) == (16, 16)
    with pytest.raises(ConfigError, match=r"rollout\.min_new_tokens \(17\) .*rollout\.max_new_tokens \(16\)"):
        load_config(overrides={"rollout.max_new_tokens": "16", "rollout.min_new_tokens": "17"})
    with pytest.raises(ConfigError, match=r"rollout\.min_new_tokens \(-1\)"):
        load_config(overrides={"rollout.min_new_tokens": "-1"})


def test_overlong_penalty_and_mask_truncated_options():
    defaults = RunConfig()
    assert (defaults.reward.overlong_buffer, defaults.reward.overlong_penalty, defaults.train.mask_truncated) == \
        (0, 1.0, False)
    cfg = load_config(overrides={"rollout.max_new_tokens": "16", "reward.overlong_buffer": "16",
                                 "reward.overlong_penalty": "0.5", "train.mask_truncated": "true"})
    assert (cfg.reward.overlong_buffer, cfg.reward.overlong_penalty, cfg.train.mask_truncated) == (16, 0.5, True)
    with pytest.raises(ConfigError, match=r"reward\.overlong_buffer \(17\) .*rollout\.max_new_tokens \(16\)"):
        load_config(overrides={"rollout.max_new_tokens": "16", "reward.overlong_buffer": "17"})
    with pytest.raises(ConfigError, match=r"reward\.overlong_buffer \(-1\)"):
        load_config(overrides={"reward.overlong_buffer": "-1"})
    with pytest.raises(ConfigError, match=r"reward\.overlong_penalty must be a finite number >= 0"):
        load_config(overrides={"reward.overlong_buffer": "4", "reward.overlong_penalty": "-1"})


def test_sample_logging_options():
    assert (RunConfig().output.log_samples_every, RunConfig().output.log_samples) == (10, 4)
    assert load_config(overrides={"output.log_samples_every": "0"}).output.log_samples_every == 0
    for key, value in (("output.log_samples_every", "-1"), ("output.log_samples", "0")):
        with pytest.raises(ConfigError, match=r"output\.log_samples_every must be >= 0 .*output\.log_samples >= 1"):
            load_config(overrides={key: value})


def test_importance_sampling_band_as_openrlhf():
    cfg = load_config(overrides={"algo.tis_level": "sequence_geometric", "algo.tis_mode": "mask",
                                 "algo.tis_floor": "0.5", "algo.tis_cap": "5"})
    assert (cfg.algo.tis_floor, cfg.algo.tis_cap) == (0.5, 5.0)
    assert RunConfig().algo.tis_floor == 0.0  # no lower bound unless asked


@pytest.mark.parametrize(
    "key",
    ["train.num_steps", "train.prompts_per_step", "rollout.n_samples_per_prompt", "rollout.prompts_per_grant",
     "rollout.max_new_tokens", "rollout.num_processes", "train.micro_batch_tokens", "train.ppo_epochs"],
)
def test_positive_counts(key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides={key: "0"})


def test_max_staleness_non_negative():
    assert load_config(overrides={"train.max_staleness": "0"}).train.max_staleness == 0
    with pytest.raises(ConfigError, match="train.max_staleness"):
        load_config(overrides={"train.max_staleness": "-1"})


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_temperature_must_be_finite(value):
    with pytest.raises(ConfigError, match="rollout.temperature"):
        load_config(overrides={"rollout.temperature": value})


def test_top_k_below_minus_one_rejected():
    with pytest.raises(ConfigError, match="rollout.top_k"):
        load_config(overrides={"rollout.top_k": "-5"})


@pytest.mark.parametrize("value", ["[a, b]", "[-1]", "['3']"])
def test_stop_token_ids_must_be_token_ids(value):
    with pytest.raises(ConfigError, match="rollout.stop_token_ids"):
        load_config(overrides={"rollout.stop_token_ids": value})


def test_stop_strings_are_non_empty_strings():
    # as a flag gives them: YAML, where a double-quoted "\n" is a newline
    assert load_config(overrides={"rollout.stop_strings": r'["\n\n", "</answer>"]'}).rollout.stop_strings == [
        "\n\n", "</answer>"]
    assert load_config(overrides={"rollout.stop_strings": "Question:"}).rollout.stop_strings == ["Question:"]
    for value in ("['a', '']", "[3]"):
        with pytest.raises(ConfigError, match="rollout.stop_strings must be non-empty strings"):
            load_config(overrides={"rollout.stop_strings": value})


# --------------------------------------------------------------------------- argparse integration


def test_config_from_args_parses_flags():
    args = make_parser().parse_args(
        ["--train.lr", "1e-3", "--rollout.stop_token_ids", "[3,4]", "--output.progress", "false",
         "--rollout.top_k", "-1", "--run_id", "abc", "--model.lora_target_modules", "q_proj"])
    cfg = config_from_args(args)
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.rollout.stop_token_ids == [3, 4]
    assert cfg.output.progress is False
    assert cfg.rollout.top_k == -1
    assert cfg.run_id == "abc"
    assert cfg.model.lora_target_modules == ["q_proj"]
    # flags not given keep their defaults (argparse.SUPPRESS: absent from the namespace)
    assert cfg.train.num_steps == RunConfig().train.num_steps
    assert "train.num_steps" not in vars(args)


def test_config_from_args_no_flags_gives_defaults():
    assert config_from_args(make_parser().parse_args([])) == RunConfig()


def test_config_from_args_flags_override_file(tmp_path):
    path = write_yaml(tmp_path, "train:\n  lr: 0.5\n  num_steps: 3\n")
    cfg = config_from_args(make_parser().parse_args(["--config", str(path), "--train.lr", "0.25"]))
    assert cfg.train.lr == 0.25 and cfg.train.num_steps == 3


def test_config_from_args_bad_value_names_key():
    args = make_parser().parse_args(["--train.num_steps", "many"])
    with pytest.raises(ConfigError, match=r"train\.num_steps.*command line"):
        config_from_args(args)


def test_unknown_flag_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--train.bogus", "1"])
    assert "--train.bogus" in capsys.readouterr().err


def _help_entries(help_text: str) -> dict[str, str]:
    """Option name -> its help text (continuation lines joined, whitespace normalised)."""
    entries: dict[str, list[str]] = {}
    current = None
    for line in help_text.splitlines():
        stripped = line.strip()
        if line.startswith("  -"):
            name = stripped.split()[0].rstrip(",")
            if name == "-h":
                name = "--help"
            current = name
            entries[current] = [stripped]
        elif current is not None and line.startswith("    ") and stripped:
            entries[current].append(stripped)
        else:
            current = None
    return {k: " ".join(" ".join(v).split()) for k, v in entries.items()}


def test_help_lists_every_leaf_field_with_its_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # force wrapping: defaults must survive it
    text = make_parser().format_help()
    entries = _help_entries(text)
    leaves = list(leaf_fields())
    assert len(leaves) > 60
    for key, default, f in leaves:
        entry = entries.get(f"--{key}")
        assert entry is not None, f"--{key} has no help entry"
        assert f"(default: {json.dumps(default)})" in entry, f"--{key}: default {default!r} missing in {entry!r}"
        # the field's own help text is there too (first few words, as wrapping may split the rest)
        assert " ".join(f.metadata["help"].split()[:3]) in entry, f"--{key}: help text missing"
        for choice in f.metadata.get("choices") or ():
            assert str(choice) in entry
    # every section shows up as an argument group with its description
    for f in dataclasses.fields(RunConfig()):
        if dataclasses.is_dataclass(getattr(RunConfig(), f.name)):
            assert f"\n{f.name}:\n" in text
    assert "--config" in entries


def test_every_flag_parses_its_own_default():
    """Feeding every default back as a flag (the way a launch script would) yields the default config."""
    argv = []
    for key, default, _ in leaf_fields():
        if isinstance(default, bool):
            text = str(default).lower()
        elif isinstance(default, list):
            text = json.dumps(default)
        else:
            text = str(default)
        if text.startswith("-") and not text.lstrip("-").replace(".", "").isdigit():
            continue
        argv += [f"--{key}", text]
    cfg = config_from_args(make_parser().parse_args(argv))
    assert cfg == RunConfig()


def _config_get(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "protocol.config_get", "launch/x.sh", str(cwd), *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_config_get_subprocess(tmp_path):
    """The launch scripts' reading: the flags rewritten with absolute paths, and the values asked for."""
    path = write_yaml(tmp_path, "rollout:\n  stop_token_ids: [3, 4]\n  temperature: 7e-1\n")
    out = _config_get(tmp_path, "lr=train.lr", "top_k=rollout.top_k", "stop=rollout.stop_token_ids", "data=data.path",
                      "--", "--config", "run.yaml", "--train.lr", "0.5", "--rollout.top_k", "5",
                      "--data.path", "p.jsonl")
    assert out.returncode == 0, out.stderr
    shell = f"{out.stdout}\nprintf '%s\\n' \"${{args[@]}}\" \"$lr\" \"$top_k\" \"$stop\" \"$data\""
    printed = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, check=True).stdout.splitlines()
    assert printed == ["--config", str(path), "--train.lr", "0.5", "--rollout.top_k", "5",
                       "--data.path", str(tmp_path / "p.jsonl"), "0.5", "5", "3,4", str(tmp_path / "p.jsonl")]


def test_config_get_reports_a_mistake_in_one_line(tmp_path):
    out = _config_get(tmp_path, "--", "--train.num_stesp", "3")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == ["launch/x.sh: error: unknown option --train.num_stesp; did you mean "
                                       "--train.num_steps? (every option: python -m learner --help)"]
    out = _config_get(tmp_path, "--", "--train.num_steps", "many")
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1
    assert out.stderr.startswith("launch/x.sh: error: train.num_steps expects int")


# --------------------------------------------------------------------------- mistyped flags and keys


def test_mistyped_flag_is_one_line_naming_the_closest_key(capsys):
    parser = ConfigArgumentParser(prog="prog")
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--train.num_stesp", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["prog: error: unknown option --train.num_stesp; did you mean --train.num_steps? "
                                "(every option: python -m learner --help)"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--train.num_step", "3"])  # no abbreviations: a YAML file takes none either
    assert "did you mean --train.num_steps?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["train.lr", "3"])
    assert capsys.readouterr().err.splitlines() == [
        "prog: error: unexpected argument 'train.lr' (config keys are given as --section.key value) "
        "(every option: python -m learner --help)"]


def test_unknown_yaml_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"'train\.num_stesp'.*did you mean num_steps\?"):
        load_config(write_yaml(tmp_path, "train:\n  num_stesp: 3\n"))


# --------------------------------------------------------------------------- paths


def test_paths_in_a_yaml_file_are_taken_from_its_directory(tmp_path):
    (tmp_path / "models" / "m").mkdir(parents=True)
    path = write_yaml(tmp_path, "model:\n  path: models/m\ndata:\n  path: prompts.jsonl\noutput:\n  dir: ../out\n"
                                "reward:\n  function: rewards/r.py:score\n"
                                "critic:\n  path: Qwen/Qwen2.5-0.5B\n", name="run.yaml")
    cfg = load_config(path)
    assert cfg.model.path == str(tmp_path / "models" / "m")  # an existing directory, not a Hub id
    assert cfg.data.path == [str(tmp_path / "prompts.jsonl")]  # a data file, though it does not exist (yet)
    assert cfg.output.dir == str(tmp_path.parent / "out")
    assert cfg.reward.function == [f"{tmp_path / 'rewards' / 'r.py'}:score"]
    assert cfg.critic.path == "Qwen/Qwen2.5-0.5B"  # a Hub id stays one


def test_paths_in_flags_are_taken_from_cwd_when_given(tmp_path):
    flags = ["--data.path", "p.jsonl", "--model.path", "./m", "--reward.function", "learner.tasks.gsm8k:gsm8k_reward",
             "--replay.path", "/abs/rec", "--output.dir", "~/runs/x", "--transport.curve_dir", "keys"]
    cfg = config_from_args(make_parser().parse_args(flags), cwd=tmp_path)
    assert (cfg.data.path, cfg.model.path) == ([str(tmp_path / "p.jsonl")], str(tmp_path / "m"))
    assert cfg.reward.function == ["learner.tasks.gsm8k:gsm8k_reward"]  # a module, not a path
    assert (cfg.replay.path, cfg.transport.curve_dir) == ("/abs/rec", str(tmp_path / "keys"))
    assert cfg.output.dir == str(Path.home() / "runs" / "x")
    # without cwd (a process started where the user is) they stay as given
    assert config_from_args(make_parser().parse_args(flags)).data.path == ["p.jsonl"]


def test_data_sources_are_lists_with_one_split_subset_and_weight_per_path_or_one_for_all():
    cfg = load_config(overrides={"data.path": "a.jsonl,org/name", "data.split": "train[:10]",
                                 "data.subset": "[null, main]", "data.weights": "1,3"})
    assert (cfg.data.path, cfg.data.split, cfg.data.subset, cfg.data.weights) == (
        ["a.jsonl", "org/name"], ["train[:10]"], [None, "main"], [1, 3])
    assert load_config(overrides={"data.path": "*.jsonl"}).data.path == ["*.jsonl"]  # not a YAML alias
    cases = [({"data.weights": "1,2,3"}, r"data.weights has 3 entries but data.path names 2 dataset\(s\): give one "
                                          r"weight per dataset, or none \(concatenated\)"),
             ({"data.split": "a,b,c"}, "data.split has 3 entries .* one split for all, or one per dataset"),
             ({"data.subset": "a,b,c"}, "data.subset has 3 entries .* none, one for all, or one per dataset"),
             ({"data.weights": "1,0"}, r"data.weights must be finite numbers > 0, got \[1, 0\]"),
             ({"data.split": "[]"}, "data.split needs a split"),
             ({"data.subset": "[3]"}, "data.subset entries must be strings")]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(overrides={"data.path": "a.jsonl,b.jsonl", **extra})


def test_dataset_paths_keep_hub_ids_and_resolve_files_and_globs(tmp_path):
    (tmp_path / "corpus").mkdir()
    flags = ["--data.path", "openai/gsm8k,data/*.jsonl,p.csv,corpus,squad"]
    cfg = config_from_args(make_parser().parse_args(flags), cwd=tmp_path)
    assert cfg.data.path == ["openai/gsm8k", str(tmp_path / "data" / "*.jsonl"), str(tmp_path / "p.csv"),
                             str(tmp_path / "corpus"), "squad"]
    assert absolute_flags(make_parser().parse_args(flags), tmp_path) == ["--data.path", ",".join(cfg.data.path)]


def test_absolute_flags_give_the_same_config_anywhere(tmp_path):
    args = make_parser().parse_args(["--config", "run.yaml", "--model.path", "org/name", "--train.lr", "0.5",
                                     "--reward.function", "r.py:f", "--output.dir=out"])
    write_yaml(tmp_path, "train:\n  num_steps: 3\n")
    flags = absolute_flags(args, tmp_path)
    assert flags == ["--config", str(tmp_path / "run.yaml"), "--model.path", "org/name", "--train.lr", "0.5",
                     "--reward.function", f"{tmp_path / 'r.py'}:f", "--output.dir", str(tmp_path / "out")]
    assert config_from_args(make_parser().parse_args(flags)) == config_from_args(args, cwd=tmp_path)


def test_reward_functions_are_a_list_a_yaml_list_comma_separated_or_one_string(tmp_path):
    path = write_yaml(tmp_path, "reward:\n  function: [r.py:a, pkg.mod:b]\n  function_weights: [0.5, 2]\n")
    assert load_config(path).reward.function == [f"{tmp_path / 'r.py'}:a", "pkg.mod:b"]
    flags = make_parser().parse_args(["--reward.function", "r.py:a,pkg.mod:b", "--reward.function_weights", "0.5,2"])
    cfg = config_from_args(flags, cwd=tmp_path)
    assert cfg.reward.function == [f"{tmp_path / 'r.py'}:a", "pkg.mod:b"] and cfg.reward.function_weights == [0.5, 2]
    assert absolute_flags(flags, tmp_path)[:2] == ["--reward.function", f"{tmp_path / 'r.py'}:a,pkg.mod:b"]
    single = write_yaml(tmp_path, "reward:\n  function: r.py:a\n", name="single.yaml")
    assert load_config(single).reward.function == [f"{tmp_path / 'r.py'}:a"]  # as before the list
    assert config_from_dict({"reward": {"function": "pkg.mod:b"}}).reward.function == ["pkg.mod:b"]  # old recordings


@pytest.mark.parametrize(("overrides", "message"), [
    ({"reward.function": "a:f,b:g", "reward.function_weights": "1"},
     r"^reward\.function_weights has 1 weight\(s\) but reward\.function names 2 function\(s\)"),
    ({"reward.function": "a:f", "reward.function_weights": "[.nan]"}, r"reward\.function_weights must be finite"),
    ({"reward.function": "a:f,"}, r"reward\.function entry 2 must be a 'module:function' string, got ''"),
    ({"reward.url": "localhost:8000"}, r"reward\.url must be an http:// or https:// URL"),
    ({"reward.timeout_s": "0"}, r"reward\.timeout_s must be > 0"),
    ({"reward.retries": "-1"}, r"reward\.retries >= 0"),
])
def test_reward_options_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_every_path_field_has_a_kind():
    keys = {key for key, _, _ in path_fields(RunConfig())}
    assert keys == {"model.path", "critic.path", "data.path", "reward.function", "reward.model_path",
                    "transport.weight_dir", "transport.curve_dir", "output.dir", "replay.path", "eval.path"}


def _model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_check_inputs_names_the_option_and_the_path(tmp_path):
    model, data = _model_dir(tmp_path / "m"), write_yaml(tmp_path, "", name="p.jsonl")
    ok = dict(overrides={"model.path": str(model), "data.path": str(data),
                         "reward.function": "learner.tasks.arithmetic:arithmetic_reward"})
    check_inputs(load_config(**ok), "learner")
    cases = {"data.path": (str(tmp_path / "nope.jsonl"), "no such file or directory"),
             "model.path": ("/models/does-not-exist", "no such directory"),
             "reward.model_path": (str(tmp_path), "not a Hugging Face model directory (no config.json)"),
             "reward.function": (f"{tmp_path}/r.py:score", "no such file"),
             "replay.path": (str(tmp_path / "rec"), "no such file or directory")}
    for key, (value, problem) in cases.items():
        cfg = load_config(overrides={**ok["overrides"], key: value})
        with pytest.raises(ConfigError) as exc:
            check_inputs(cfg, "learner")
        assert str(exc.value) == f"--{key} {value}: {problem}"
    with pytest.raises(ConfigError, match=r"--reward.function nomodule_xyz:f: no module named 'nomodule_xyz'"):
        check_inputs(load_config(overrides={**ok["overrides"], "reward.function": "nomodule_xyz:f"}), "learner")
    # a Hub id is not checked (the loaders resolve it); a rollout reads only the model and the keys
    check_inputs(load_config(overrides={**ok["overrides"], "model.path": "Qwen/Qwen2.5-0.5B"}), "learner")
    check_inputs(load_config(overrides={**ok["overrides"], "data.path": f"openai/gsm8k,{tmp_path}/*.jsonl"}), "learner")
    with pytest.raises(ConfigError, match=rf"^--data.path {tmp_path}/d/\*.jsonl: no file matches this pattern$"):
        check_inputs(load_config(overrides={**ok["overrides"], "data.path": f"{tmp_path}/d/*.jsonl"}), "learner")
    check_inputs(load_config(overrides={"model.path": str(model), "data.path": "nope.jsonl"}), "rollout")
    with pytest.raises(ConfigError, match="--model.path ./missing: no such directory"):
        check_inputs(load_config(overrides={"model.path": "./missing"}), "rollout")


def test_a_learner_needs_a_reward(tmp_path):
    """No silent reward: the default is none, and a run without one says how to give one."""
    assert RunConfig().reward.function == [] and RunConfig().reward.model_path == ""
    cfg = load_config(overrides={"model.path": str(_model_dir(tmp_path / "m"))})
    with pytest.raises(ConfigError, match=r"^no reward: give --reward.function .*--reward.model_path"):
        check_inputs(cfg, "learner")
    check_inputs(cfg, "rollout")  # a rollout scores nothing
    cfg.reward.model_path = cfg.model.path
    check_inputs(cfg, "learner")
    check_inputs(load_config(overrides={"model.path": cfg.model.path, "reward.url": "http://127.0.0.1:1/"}),
                 "learner")


# --------------------------------------------------------------------------- defaults for real models


def test_defaults_fit_a_real_model_and_the_tiny_job_keeps_its_values():
    cfg = RunConfig()
    assert (cfg.rollout.max_new_tokens, cfg.rollout.max_model_len, cfg.data.max_prompt_len) == (1024, 2048, 0)
    assert cfg.prompt_len_limit == 1024  # what a whole response leaves
    tiny = load_config(REPO / "configs" / "tiny.yaml")
    assert (tiny.rollout.max_new_tokens, tiny.rollout.max_model_len, tiny.prompt_len_limit) == (4, 64, 60)
    assert tiny.reward.function == ["learner.tasks.arithmetic:arithmetic_reward"]
    assert tiny.output.dir == str(REPO / "runs" / "tiny")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"rollout.max_new_tokens": "2048"},
     r"rollout\.max_model_len \(2048\) leaves no room for a prompt after rollout\.max_new_tokens \(2048\)"),
    ({"rollout.max_model_len": "1", "data.max_prompt_len": "8", "rollout.max_new_tokens": "1"},
     r"rollout\.max_model_len \(1\) leaves no room for a prompt: raise"),
    ({"data.max_prompt_len": "-1"}, r"data\.max_prompt_len must be >= 0"),
])
def test_a_prompt_must_have_room_in_the_engine(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_prompt_length_limit():
    assert load_config(overrides={"rollout.max_new_tokens": "100"}).prompt_len_limit == 1948
    assert load_config(overrides={"data.max_prompt_len": "1500"}).prompt_len_limit == 1500  # the response may be cut
    assert load_config(overrides={"data.max_prompt_len": "4096"}).prompt_len_limit == 2047  # what vLLM takes
