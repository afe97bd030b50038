"""Hugging Face ``datasets`` streaming reader: ``load_dataset(..., streaming=True)``.

Works with Hub names and with local files or directories (``hf_name`` = ``json`` /
``parquet`` / a directory, ``paths`` = data files). The dataset is one logical "file", so
ranks and DataLoader workers split it by record index; the position is the number of
records consumed and a resume uses ``IterableDataset.skip``.
"""

from __future__ import annotations

from data_pipeline.readers.base import Reader, expand_paths
from data_pipeline.readers.jsonl import record_to_document
from data_pipeline.step import StepStats

_BUILDERS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".jsonl.zst": "json",
             ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def _builder_for(files: list[str]) -> str | None:
    for ext, builder in _BUILDERS.items():
        if all(f.endswith(ext) for f in files):
            return builder
    return None


class HFReader(Reader):
    name = "hf_reader"

    def __init__(self, name: str | None = None, paths=None, config: str | None = None,
                 split: str = "train", source: str = "hf", shard: int = 0, num_shards: int = 1,
                 text_key: str = "text", id_key: str = "id", url_key: str = "url"):
        self.data_files = expand_paths(paths) if paths else None
        self.hf_name = name or (_builder_for(self.data_files) if self.data_files else None)
        if self.hf_name is None:
            raise ValueError("hf source: give hf_name (a Hub dataset or local dir) or data files with a known extension")
        self.config, self.split = config, split
        self.text_key, self.id_key, self.url_key = text_key, id_key, url_key
        self.files = [f"hf:{self.hf_name}:{config}:{split}:" + ",".join(self.data_files or [])]
        self.source = source
        self.stats = StepStats()
        self.set_shard(shard, num_shards)

    def _dataset(self):
        import datasets

        kw = {"streaming": True, "split": self.split}
        if self.data_files:
            kw["data_files"] = self.data_files
        return datasets.load_dataset(self.hf_name, self.config, **kw)

    def _records(self, path: str, start):
        done = start or 0
        ds = self._dataset()
        if done:
            ds = ds.skip(done)
        for rec in ds:
            item = record_to_document(rec, self.text_key, self.id_key, self.url_key, self.source,
                                      f"{self.hf_name}:{done}", self.hf_name)
            done += 1
            yield done, item
