"""launch/tpu_vm.sh builds the right gcloud commands (DRY_RUN=1 prints instead of running)."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(*args, **env):
  """Runs the script dry; returns the completed process."""
  return subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_vm.sh"), *args], cwd=ROOT,
                        env=dict(os.environ, DRY_RUN="1", **env), capture_output=True, text=True,
                        timeout=60)


def test_create_train_logs_delete():
  env = dict(TPU_NAME="t1", ZONE="us-east5-a", PROJECT="p")
  create = _script("create", ACCELERATOR="v5e-64", **env)
  assert create.returncode == 0, create.stderr
  assert ("gcloud compute tpus tpu-vm create t1 --zone=us-east5-a --project=p "
          "--accelerator-type=v5litepod-64 --version=v2-alpha-tpuv5-lite") in create.stdout
  assert "--version=v2-alpha-tpuv5 " in _script("create", ACCELERATOR="v5p-64", SPOT="1",
                                                **env).stdout + " "
  train = _script("train", "--config", "configs/moca.py:size=7b", "--workdir", "gs://b/run 1", **env)
  assert train.returncode == 0, train.stderr
  assert "--worker=all" in train.stdout and "tpu_train.py --distributed" in train.stdout
  assert "--config configs/moca.py:size=7b --workdir gs://b/run\\ 1" in train.stdout
  assert "tail -n 200 -F mmembed_jax/train.log" in _script("logs", **env).stdout
  assert "tpu-vm delete t1" in _script("delete", **env).stdout
  install = _script("install", **env)
  assert "git -C" in install.stdout and "pip install -q -e '.[tpu]'" in install.stdout


def test_errors_name_what_is_missing():
  assert "set TPU_NAME" in _script("create", ZONE="z").stderr
  bad = _script("create", TPU_NAME="t", ZONE="z", ACCELERATOR="v9-8")
  assert bad.returncode == 2 and "unknown accelerator type 'v9-8'" in bad.stderr
  assert _script("train", TPU_NAME="t", ZONE="z").returncode == 2
