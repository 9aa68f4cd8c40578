"""The waiting training process imports, before its spec arrives, what training then needs."""

import os
import subprocess
import sys


def test_preload_imports_the_database_store_the_mlflow_logger_opens(tmp_path):
    """With a database tracking URI the logger opens MLflow's SQL store at the first epoch; its imports (about 1 s)
    belong to the wait, not to the train stage."""
    code = (
        "import sys\nfrom components.training.warm import preload\npreload()\n"
        "print('mlflow.store.tracking.sqlalchemy_store' in sys.modules)"
    )
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "True"
