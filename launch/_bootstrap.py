"""Make a launch script runnable from a clone without installation, and tolerate launchers.

``deepspeed`` appends ``--local_rank=N`` to the script's arguments, which Hydra would
reject as an override; the value is moved into the LOCAL_RANK environment variable that
torchrun and accelerate set anyway.
"""

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def strip_launcher_args() -> None:
    kept = []
    args = sys.argv[1:]
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(args):
            os.environ.setdefault("LOCAL_RANK", args[i + 1])
            i += 1
        else:
            kept.append(a)
        i += 1
    sys.argv[1:] = kept


strip_launcher_args()


def exit_on_checkpoint_error(main):
    """Decorate a launch script's ``main``: a checkpoint that does not verify, is unsafe to
    unpickle or cannot be read ends the process with its message (which names the files)
    and exit status 3, not a traceback."""
    import functools

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        from train.checkpoint import CheckpointError

        try:
            return main(*args, **kwargs)
        except CheckpointError as e:
            print(f"[kiln] checkpoint error: {e}", file=sys.stderr, flush=True)
            sys.exit(3)

    return wrapper


def check_overrides(config_name: str) -> None:
    """Compose ``config_name`` with this command line's overrides before Hydra runs the job:
    a misspelt key or a value of the wrong type then ends with exit status 2 and a message
    naming the key (as kiln's own config errors do) and leaves no run directory behind.
    Command lines with Hydra's own flags (--cfg, -m, ...) go to Hydra unchecked."""
    args = sys.argv[1:]
    if any(a.startswith("-") or a.startswith("hydra.") or a.startswith("hydra/") for a in args):
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=os.path.join(REPO_ROOT, "conf"), version_base=None):
            compose(config_name, overrides=args)
    except (HydraException, OmegaConfBaseException) as e:
        cause = f" ({e.__cause__})" if e.__cause__ else ""
        print(f"config error: {e}{cause}".replace("\n", " "), file=sys.stderr)
        sys.exit(2)


def print_validation(result: dict) -> None:
    """The run's validation loss, first evaluation to last, as every training launcher reports it."""
    vals = result["val_losses"]
    if vals:
        first, last = min(vals), max(vals)
        print(f"[kiln] validation loss {vals[first]:.3f} (step {first}) -> {vals[last]:.3f} (step {last})")


def leave(backend) -> None:
    """End a launch script's process once its work is done and saved. In a multi-process run
    the process exits at once after leaving the process group, without Python's interpreter
    teardown: teardown destroys C++ objects that outlive the group (gloo worker threads held
    by a DDP or FSDP module, DeepSpeed engines) in no fixed order, and torch can abort there
    ("terminate called without an active exception", SIGABRT) after a run that fully
    succeeded, which the launcher then reports as a failed job."""
    import logging

    multi = backend.world_size > 1
    backend.shutdown()
    if multi:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
