"""kiln's checkpoints: one package owns the directory layout, writing, verification,
selection, pruning and the pieces of state. Its modules: ``layout`` (every name),
``reading`` (small files as untrusted input), ``manifest`` (what a checkpoint is, and
verification), ``store`` (atomic saves, ``latest``, selection, pruning, clean-up), ``state``
(the pieces of a run's state, as objects with ``state_dict``/``load_state_dict``), ``rng``,
``full_state`` (the portable weights+moments form every backend reads and writes),
``safe_unpickle`` (the formats that pickle), ``convert`` (writers for other formats) and
``manager`` (the run's saves and resume, across ranks, synchronous or in the background).

Layout (the same for every backend)::

    <checkpoint root>/
      latest                  text file naming the newest complete checkpoint (moved last)
      step_00000100/
        meta.json             step, tokens, backend, world size, manifest; written last
        trainer_state.json    step, tokens, data-stream state, RNG states per rank
        config.yaml           the resolved run config
        model_config.yaml     the architecture
        tokenizer.model       the tokenizer travels with the weights
        model.safetensors     (single/ddp/consolidated) full weights
        optimizer.safetensors (single/ddp/consolidated) AdamW moments by parameter name
        dcp/ | deepspeed/     (fsdp | deepspeed) the backend's native shards

A checkpoint is written into ``.tmp-step_N``; every file is fsynced and hashed into the
manifest (size and xxh3-128 of its content), then the directory is renamed into place and
``latest`` is replaced atomically. A crash at any point leaves the previous checkpoint
untouched. ``verify`` checks a directory against its manifest (``full``: contents,
``size``: sizes only), and ``select`` returns the newest checkpoint that verifies together
with the ones it skipped and why, so a truncated, bit-flipped or half-copied directory is
never resumed silently.

A checkpoint is untrusted input (people pass them around), and it is exactly the files its
manifest lists. Whatever the verify mode, ``verify`` refuses a checkpoint that holds a file
or directory the manifest does not list, a symbolic link anywhere (or is one), a special
file, or a manifest entry that is absolute or leaves the directory. Readers take their
paths from the manifest (``listed``, ``storage_format``, ``deepspeed_tag``), never from a
directory listing or a pointer file, so nothing added beside the listed files is ever read.
"""

from train.checkpoint.layout import (  # noqa: F401
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    ADAPTER_OPTIM_FILE,
    CARRIED,
    CHAT_TEMPLATE,
    CONFIG,
    DCP_DIR,
    DS_DIR,
    HASH,
    LABELS_FILE,
    LATEST,
    META,
    MODEL_CONFIG,
    MODEL_FILE,
    OPTIM_FILE,
    TOKENIZER,
    TRAINER_STATE,
    VERIFY_MODES,
    CheckpointError,
    CheckpointNotFound,
    list_checkpoints,
    step_dir_name,
)
from train.checkpoint.manifest import (  # noqa: F401
    dcp_files,
    deepspeed_tag,
    digest,
    ds_files,
    file_digest,
    is_complete,
    listed,
    manifest,
    storage_format,
    structure_problems,
    verify,
)
from train.checkpoint.reading import (  # noqa: F401
    read_json,
    read_meta,
    read_model_config,
    read_trainer_state,
    read_yaml,
    torch_load,
)
from train.checkpoint.store import (  # noqa: F401
    begin,
    clean_stale,
    commit,
    copy_carried,
    describe_skipped,
    find_latest,
    prune,
    resolve,
    seal,
    select,
    write_json_atomic,
)
