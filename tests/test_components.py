import logging

import pytest
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from lib.core.callbacks import (
    SafeCallback,
    ScheduleCallback,
    parse_schedules,
    schedule_value,
)
from lib.core.errors import UserError
from lib.core.registry import Registry, resolve_attn_implementation


def test_registry_falls_back_with_a_warning(caplog):
    reg = Registry("kernel")
    reg.register("fast", "F", fallback="medium", available=lambda: False)
    reg.register("medium", "M", fallback="slow")
    reg.register("slow", "S")
    with caplog.at_level(logging.WARNING):
        assert reg.get("fast") == "M"
    assert "falling back to 'medium'" in caplog.text
    assert reg.chain("fast") == ["medium", "slow"]
    with pytest.raises(UserError, match="Unknown kernel 'turbo'; choose one of: fast, medium, slow"):
        reg.get("turbo")


def test_attention_is_checked_against_the_machine_and_the_model_class_up_front():
    import torch

    class NoSdpa:
        _supports_sdpa = False
        _supports_flash_attn = True

    if not torch.cuda.is_available():
        assert resolve_attn_implementation("flash_attention_2") == "sdpa"
        assert resolve_attn_implementation("flash_attention_2", NoSdpa) == "eager"
    assert resolve_attn_implementation("sdpa", NoSdpa) == "eager"
    assert resolve_attn_implementation("eager", NoSdpa) == "eager"
    assert resolve_attn_implementation(None) is None


def test_schedules_anneal_and_switch():
    s = parse_schedules('[{"name": "a", "start": 0, "end": 1, "from_epoch": 1, "to_epoch": 3},'
                        ' {"name": "b", "value": 5, "at_epoch": 2}]')
    assert schedule_value(s[0], 0.5, 9) == 0 and schedule_value(s[0], 2, 9) == 0.5 and schedule_value(s[0], 4, 9) == 1
    assert schedule_value(s[1], 1.9, 7) == 7 and schedule_value(s[1], 2.0, 7) == 5
    with pytest.raises(UserError, match="needs either start/end"):
        parse_schedules([{"name": "c"}])


def test_schedule_callback_drives_the_target_from_the_step_counter():
    target = {"route_loss_coef": 1.0, "aux_loss_coef": 0.0}
    cb = ScheduleCallback(parse_schedules([{"name": "aux_loss_coef", "value": 0.5, "at_epoch": 1}]), target)
    state = TrainerState()
    state.max_steps, state.num_train_epochs, state.global_step = 20, 2, 0
    args = TrainingArguments(output_dir="/tmp/unused", report_to="none")
    cb.on_train_begin(args, state, TrainerControl())
    assert target["aux_loss_coef"] == 0.0
    state.global_step = 10
    cb.on_step_begin(args, state, TrainerControl())
    assert target["aux_loss_coef"] == 0.5
    with pytest.raises(UserError, match="not schedulable"):
        ScheduleCallback(parse_schedules([{"name": "lr", "value": 1, "at_epoch": 1}]), target)


def test_safe_callback_warns_instead_of_raising(caplog):
    class Broken(TrainerCallback):
        def on_log(self, args, state, control, **kwargs):
            raise RuntimeError("tracker down")

    cb = SafeCallback(Broken())
    with caplog.at_level(logging.WARNING):
        assert cb.on_log(None, None, None, logs={}) is None
        cb.on_log(None, None, None, logs={})
    assert caplog.text.count("tracker down") == 1
    assert cb.on_step_end(None, None, "ctl") is None  # events the inner callback does not override still work


def test_user_callbacks_named_in_a_recipe_run_fault_isolated(tmp_path, pool_files, caplog):
    import json
    import os

    import train_router
    from lib.core.callbacks import load_user_callbacks

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: builtin:tiny-mixtral\n"
                      "callbacks: [tests.user_callbacks:RecordSteps, tests.user_callbacks:Broken]\n")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        train_router.main([str(recipe), "--train_file", pool_files["train"], "--output_dir", str(out),
                           "--synthetic_negatives", "--max_steps", "3", "--logging_steps", "1", "--report_to", "none",
                           "--save_strategy", "no", "--max_seq_length", "32"])
    assert json.load(open(os.path.join(out, "user_callback_steps.json")))[:3] == [1, 2, 3]
    assert caplog.text.count("this plugin is broken") == 1  # warned once, training went on
    with pytest.raises(UserError, match="cannot import module 'no_such_module'"):
        load_user_callbacks(["no_such_module:Thing"])
    with pytest.raises(UserError, match="name a callback as module:Class"):
        load_user_callbacks(["tests.user_callbacks"])
