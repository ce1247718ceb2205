"""Run an entry script with a stop signal that one rank sends itself before a given optimiser step
(test_run_lifecycle.py): what SLURM's `--signal` or a preemption does, at a step the test chooses.

    python tests/signal_run.py --at_step 5 --rank 1 --signal SIGTERM train_nlvr.py --config ... --output_dir ...
"""

import argparse
import os
import runpy
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--at_step", type=int, required=True)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--signal", default="SIGTERM")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    real_step = utils.optimizer_step

    def step_then_signal(state, lr, norm=False):
        if state.step == args.at_step and utils.get_rank() == args.rank:
            os.kill(os.getpid(), getattr(signal, args.signal))
        return real_step(state, lr, norm)

    utils.optimizer_step = step_then_signal
    sys.argv = [args.script, *args.args]
    runpy.run_path(args.script, run_name="__main__")


if __name__ == "__main__":
    main()
