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
    """Decorate a launch script's ``main``: a checkpoint that does not
    verify, is unsafe to unpickle or cannot be read ends the process with its message
    (which names the files) and exit status 3, not a traceback. The job's config is noted
    as Hydra hands it over (kiln writes ``<run_dir>/.hydra/`` itself once the start
    succeeded: train/run_dir.py), and a start that fails in any way is undone: a run
    directory this launch created is removed, one that existed is left as it was."""
    import functools

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        from omegaconf import DictConfig

        from train import run_dir
        from train.checkpoint import CheckpointError

        if args and isinstance(args[0], DictConfig):  # a Hydra job (the tools' main takes no config)
            run_dir.note_job(args[0])
        try:
            return main(*args, **kwargs)
        except CheckpointError as e:
            print(f"[kiln] checkpoint error: {e}", file=sys.stderr, flush=True)
            run_dir.discard_failed_start()
            sys.exit(3)
        except Exception:
            run_dir.discard_failed_start()
            raise

    return wrapper


# Hydra's flags that take a value as the next argument; --config-name (-cn) is followed,
# the others (--config-path, --cfg, -m, --help, ...) leave the command line to Hydra unchecked.
_CONFIG_NAME_FLAGS = ("--config-name", "-cn")


def check_overrides(config_name: str) -> None:
    """Compose ``config_name`` (or ``--config-name``'s) with this command line's overrides,
    ``hydra.*`` ones included, before Hydra runs the job: a misspelt key or a value of the
    wrong type then ends with exit status 2 and a message naming the key (as kiln's own
    config errors do), before Hydra creates anything. Notes which run directories exist
    before Hydra creates them (train/run_dir.py), so that a start that fails removes only
    what this launch made. Command lines with Hydra's other flags (--cfg, -m, --config-path,
    ...) go to Hydra unchecked."""
    args = sys.argv[1:]
    overrides = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in _CONFIG_NAME_FLAGS and i + 1 < len(args):
            config_name = args[i + 1]
            i += 2
            continue
        if a.startswith("--config-name="):
            config_name = a.split("=", 1)[1]
        elif a.startswith("-"):
            return
        else:
            overrides.append(a)
        i += 1
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=os.path.join(REPO_ROOT, "conf"), version_base=None):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        cause = f" ({e.__cause__})" if e.__cause__ else ""
        print(f"config error: {e}{cause}".replace("\n", " "), file=sys.stderr)
        sys.exit(2)
    from train import run_dir

    dirs = []
    for key in ("hydra.run.dir", "run_dir"):
        try:  # an interpolation only a running job resolves (${hydra:...}) leaves it unknown
            d = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
        except Exception:
            d = None
        if d:
            dirs.append(str(d))
    run_dir.note_launch(*dirs)


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
