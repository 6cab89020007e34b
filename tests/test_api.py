"""Importing mhd_fast changes nothing process-wide (environment, threads, RNG); the mhd-fast
command alone chooses OpenMP's waits."""
import os
import subprocess
import sys


def _python(code: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr


def test_import_changes_no_process_wide_state():
    # the package alone loads no torch, so OpenMP and torch can still be set up after it
    _python("import os, sys\n"
            "env = dict(os.environ)\n"
            "import mhd_fast\n"
            "assert 'torch' not in sys.modules, 'torch loaded'\n"
            "assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())\n")
    # nor do its names, the ops they load, or the simulator's modules change anything
    _python("import os, torch\n"
            "env, threads, rng = dict(os.environ), torch.get_num_threads(), torch.get_rng_state()\n"
            "import mhd_fast\n"
            "mhd_fast.mhd_loss, mhd_fast.TopKLogits\n"
            "import mhd_fast.train, mhd_fast.cli, mhd_fast.sweep\n"
            "assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())\n"
            "assert torch.get_num_threads() == threads\n"
            "assert torch.equal(torch.get_rng_state(), rng)\n"
            "assert 'mhd_loss' in dir(mhd_fast) and 'mhd_loss' in mhd_fast.__all__\n")


def test_the_command_sets_passive_openmp_waits_unless_the_user_chose():
    code = ("import os\n"
            "from mhd_fast import cli\n"
            "assert cli.main(['graph', 'ring', '--clients', '4']) == 0\n"
            "print(os.environ['OMP_WAIT_POLICY'])\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for given, want in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**env, **({"OMP_WAIT_POLICY": given} if given else {})},
                             timeout=300)
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines()[-1] == want
