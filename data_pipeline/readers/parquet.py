"""Parquet reader (pyarrow), streaming record batches so memory stays at one batch.

The position is the row index inside the file; a resume skips whole row groups from
the file footer and then the rows before the position in the first group.
"""

from __future__ import annotations

import os

import pyarrow.parquet as pq

from data_pipeline.readers.base import Reader, open_binary
from data_pipeline.readers.jsonl import record_to_document


class ParquetReader(Reader):
    name = "parquet_reader"

    def __init__(self, paths, source: str = "parquet", shard: int = 0, num_shards: int = 1,
                 text_key: str = "text", id_key: str = "id", url_key: str = "url", batch_size: int = 256):
        self.text_key, self.id_key, self.url_key = text_key, id_key, url_key
        self.batch_size = batch_size
        super().__init__(paths, source, shard, num_shards)

    def _records(self, path: str, start):
        row = start or 0
        with open_binary(path) as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            cols = [c for c in (self.text_key, self.id_key, self.url_key, "metadata") if c in names]
            first, skip = 0, row
            while first < pf.num_row_groups and skip >= pf.metadata.row_group(first).num_rows:
                skip -= pf.metadata.row_group(first).num_rows
                first += 1
            groups = list(range(first, pf.num_row_groups))
            if not groups:
                return
            base = os.path.basename(path)
            for batch in pf.iter_batches(batch_size=self.batch_size, row_groups=groups, columns=cols):
                for rec in batch.to_pylist():
                    if skip:
                        skip -= 1
                        continue
                    item = record_to_document(rec, self.text_key, self.id_key, self.url_key, self.source,
                                              f"{base}:{row}", path)
                    row += 1
                    yield row, item
