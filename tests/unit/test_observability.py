"""learner.metrics and learner.plot: metrics files, JSON lines on stdout, TensorBoard / W&B hooks,
the training.png at the end, resumed runs, and clear errors for missing optional packages."""

from __future__ import annotations

import json
import logging
import math
import sys
import types
from pathlib import Path

import pytest

from learner.metrics import MetricsBackendError, MetricsLogger
from learner.plot import plot_run, read_metrics, rolling_mean

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def step_metrics(step: int) -> dict[str, float]:
    return {"reward_mean": 0.3 + 0.01 * step, "kl_ref": 0.001 * step, "kl_behaviour": 0.0005,
            "tokens_per_s": 1000.0 + step, "sequences": 128.0, "entropy": 1.2}


def run_steps(logger: MetricsLogger, steps: range) -> None:
    for step in steps:
        logger.log_step_samples(step, [step * 2, step * 2 + 1], [max(step - 1, 0), step])
        logger.log(step, step_metrics(step))


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_logger_writes_metrics_steps_and_png(tmp_path):
    logger = MetricsLogger(tmp_path, total_steps=5, progress=False)
    run_steps(logger, range(5))
    logger.close()
    logger.close()  # idempotent
    metrics = read_lines(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(5))
    assert metrics[3]["reward_mean"] == pytest.approx(0.33) and "time_s" in metrics[3]
    steps = read_lines(tmp_path / "steps.jsonl")
    assert steps[2] == {"step": 2, "prompt_ids": [4, 5], "weight_versions": [1, 2]}
    assert_png(tmp_path / "training.png")


def test_plot_can_be_turned_off(tmp_path):
    logger = MetricsLogger(tmp_path, total_steps=2, progress=False, plot=False)
    run_steps(logger, range(2))
    logger.close()
    assert not (tmp_path / "training.png").exists()


def test_jsonl_stdout_prints_one_strict_json_line_per_step(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, total_steps=3, progress=False, jsonl_stdout=True, plot=False)
    run_steps(logger, range(2))
    logger.log(2, {"reward_mean": math.nan, "kl_ref": math.inf})
    logger.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for line in lines]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[1]["tokens_per_s"] == 1001.0
    assert records[2]["reward_mean"] is None and records[2]["kl_ref"] is None
    assert math.isnan(read_lines(tmp_path / "metrics.jsonl")[2]["reward_mean"])  # the file is unchanged


def test_stdout_is_quiet_by_default(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, total_steps=2, progress=False, plot=False)
    run_steps(logger, range(2))
    logger.close()
    assert capsys.readouterr().out == ""


def test_resume_keeps_earlier_lines_and_drops_retrained_ones(tmp_path):
    logger = MetricsLogger(tmp_path, total_steps=6, progress=False, plot=False)
    run_steps(logger, range(5))  # crash after step 4; the checkpoint was after step 2
    logger.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "reward_')  # a line torn by the crash
    resumed = MetricsLogger(tmp_path, total_steps=6, progress=False, first_step=3)
    run_steps(resumed, range(3, 6))
    resumed.close()
    assert [m["step"] for m in read_lines(tmp_path / "metrics.jsonl")] == list(range(6))
    assert [s["step"] for s in read_lines(tmp_path / "steps.jsonl")] == list(range(6))
    assert_png(tmp_path / "training.png")


def sample_records(step: int) -> list[dict]:
    return [{"prompt_id": 7, "prompt": "3+4=", "completion": f"{7 + i}", "reward": 1.0 - i, "advantage": 0.5 - i,
             "response_tokens": 2, "finish_reason": "stop", "weight_version": step} for i in range(2)]


def test_samples_jsonl_only_when_asked_and_resumed_like_the_metrics(tmp_path):
    off = MetricsLogger(tmp_path / "off", total_steps=1, progress=False, plot=False)
    off.close()
    assert not (tmp_path / "off" / "samples.jsonl").exists()

    logger = MetricsLogger(tmp_path, total_steps=6, progress=False, plot=False, samples=True)
    for step in (0, 2, 4):  # crash after step 4; the checkpoint was after step 2
        logger.log_samples(step, sample_records(step))
    logger.close()
    lines = read_lines(tmp_path / "samples.jsonl")
    assert lines[:2] == [{"step": 0, **record} for record in sample_records(0)]
    resumed = MetricsLogger(tmp_path, total_steps=6, progress=False, first_step=3, plot=False, samples=True)
    resumed.log_samples(4, sample_records(4))
    resumed.close()
    assert [line["step"] for line in read_lines(tmp_path / "samples.jsonl")] == [0, 0, 2, 2, 4, 4]


def test_samples_table_in_wandb(tmp_path, monkeypatch):
    logged = []

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    fake = types.SimpleNamespace(init=lambda **kw: None, log=lambda data, step: logged.append((data, step)),
                                 finish=lambda: None, Table=Table)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = MetricsLogger(tmp_path, total_steps=1, progress=False, wandb_project="proj", plot=False, samples=True)
    logger.log_samples(0, sample_records(0))
    logger.close()
    ((data, step),) = logged
    table = data["samples"]
    assert step == 0 and table.columns == ["step", *sample_records(0)[0]]
    assert table.data[1] == [0, 7, "3+4=", "8", 0.0, -0.5, 2, "stop", 0]


def hide_module(monkeypatch, *names: str) -> None:
    """Make `import name` fail as if the package were not installed."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def test_missing_tensorboard_is_a_clear_error_before_any_file(tmp_path, monkeypatch):
    hide_module(monkeypatch, "tensorboard", "torch.utils.tensorboard")
    with pytest.raises(MetricsBackendError, match=r"output\.tensorboard.*pip install tensorboard"):
        MetricsLogger(tmp_path / "run", total_steps=1, progress=False, tensorboard=True)
    assert not (tmp_path / "run").exists()


def test_missing_wandb_is_a_clear_error(tmp_path, monkeypatch):
    hide_module(monkeypatch, "wandb")
    with pytest.raises(MetricsBackendError, match=r"output\.wandb_project.*pip install wandb"):
        MetricsLogger(tmp_path, total_steps=1, progress=False, wandb_project="proj")


def test_tensorboard_scalars(tmp_path, monkeypatch):
    writers = []

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
            writers.append(self)

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            self.closed = True

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    logger = MetricsLogger(tmp_path, total_steps=4, progress=False, first_step=2, tensorboard=True, plot=False)
    run_steps(logger, range(2, 4))
    logger.close()
    (writer,) = writers
    assert writer.log_dir == str(tmp_path / "tensorboard") and writer.purge_step == 2 and writer.closed
    assert ("reward_mean", pytest.approx(0.33), 3) in writer.scalars
    assert {tag for tag, _, _ in writer.scalars} >= {"kl_ref", "tokens_per_s", "time_s"}
    assert "step" not in {tag for tag, _, _ in writer.scalars}


def test_wandb_init_log_finish(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)),
                                 log=lambda data, step: calls.append(("log", data, step)),
                                 finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = MetricsLogger(tmp_path, total_steps=2, progress=False, wandb_project="proj",
                           run_config={"train": {"lr": 1e-6}}, plot=False)
    run_steps(logger, range(2))
    logger.close()
    assert calls[0][0] == "init" and calls[0][1]["project"] == "proj"
    assert calls[0][1]["config"]["train"] == {"lr": 1e-6}
    assert [c[2] for c in calls if c[0] == "log"] == [0, 1]
    assert calls[1][1]["reward_mean"] == pytest.approx(0.3)
    assert calls[-1] == ("finish",)


def test_plot_run_skips_empty_metrics_with_a_warning(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text("")
    with caplog.at_level(logging.WARNING, logger="learner.plot"):
        assert plot_run(tmp_path / "metrics.jsonl", tmp_path / "training.png") is None
    assert not (tmp_path / "training.png").exists()
    assert "no metrics" in caplog.text
    logger = MetricsLogger(tmp_path / "empty", total_steps=1, progress=False)
    logger.close()  # no step logged: no PNG, no error
    assert not (tmp_path / "empty" / "training.png").exists()


def test_plot_run_with_partial_metrics(tmp_path):
    """Older runs or replays may lack some metrics: the panel says so instead of failing."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "reward_mean": s / 10}) + "\n" for s in range(3)))
    out = plot_run(path, tmp_path / "sub" / "p.png", window=2)
    assert out == tmp_path / "sub" / "p.png"
    assert_png(out)


def test_read_metrics_and_rolling_mean(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n\n{"step": 0, "a": 0}\n{"step": 2, "a"')
    assert [r["step"] for r in read_metrics(path)] == [0, 1]
    assert rolling_mean([1.0, 3.0, math.nan, 5.0], 2) == [1.0, 2.0, 3.0, 5.0]
