"""The progress line (trm_jax.monitor.Monitor): rates that mean what they say."""
import io

from trm_jax import monitor as monitor_lib


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_rates_leave_out_compilation_and_evaluation(tmp_path, monkeypatch):
  clock = FakeClock()
  monkeypatch.setattr(monitor_lib.time, "perf_counter", clock)
  out = io.StringIO()
  mon = monitor_lib.Monitor(tmp_path, total_steps=100, tensorboard=False, stream=out)
  metrics = {"lm_loss": 1.0}
  clock.now += 30.0  # compiling and the first 10 steps
  mon.log_train(10, metrics)
  clock.now += 5.0  # 10 steps at 2 steps/s
  mon.log_train(20, metrics)
  clock.now += 60.0  # an evaluation and a save
  mon.resume(20)
  clock.now += 1.0  # 2 steps at 2 steps/s
  mon.log_train(22, metrics)
  lines = out.getvalue().splitlines()
  assert "steps/s" not in lines[0] and "ETA" not in lines[0]  # no rate before there is one
  assert "2.00 steps/s, ETA 0m40s" in lines[1]
  # The evaluation's minute counts neither in the rate nor in the ETA (78 steps at 2/s).
  assert "2.00 steps/s, ETA 0m39s" in lines[2]

