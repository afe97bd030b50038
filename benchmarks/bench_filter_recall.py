"""What the quality filters keep and drop on the labelled sample, per configuration (prints
numbers; not a test). The sample's labels (data_pipeline/assets/sample_labels.jsonl) name
228 good English documentation pages and the junk planted among them.

    python benchmarks/bench_filter_recall.py

Rows: the embedded default (conf/data/sample.yaml: four thresholds relaxed for code-heavy
pages, and ``data.extract.mark_code=true``, where Gopher, C4 and FineWeb judge the prose and
the code of <pre> blocks stays in the text), and it without mark_code; the published
thresholds of every step (the dataclass defaults), without and with mark_code; and the FineWeb preset (``data=fineweb``: the recipe's
steps, thresholds and word tokenizer), alone and with mark_code. Then the learned quality
filter, alone on its held-out pages and in the chain after or in place of the heuristics.
``--only-quality-model`` prints only that part.
"""

from __future__ import annotations

import collections
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
JUNK = {"spam", "adult_url", "symbols", "short", "binary", "charset", "pathological", "boilerplate"}


def data_cfg(overrides):
    from hydra import compose, initialize_config_dir

    from train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base=None):
        return compose(config_name="pretrain", overrides=overrides).data


PUBLISHED = ["data.gopher_repetition.dup_ngram_fracs=[0.15,0.14,0.13,0.12,0.11,0.10]",
             "data.gopher_quality.min_alpha_words_ratio=0.8",
             "data.c4_quality.filter_curly_bracket=true", "data.fineweb_quality.char_duplicates_ratio=0.01"]
NO_CODE = ["data.extract.mark_code=false"]
CONFIGS = {  # sample.yaml (the embedded default) has mark_code on
    "sample.yaml (default)": [],
    "sample.yaml, mark_code off": NO_CODE,
    "published thresholds": PUBLISHED + NO_CODE,
    "published + mark_code": PUBLISHED,
    "data=fineweb (recipe)": ["data=fineweb"],
    "data=fineweb + mark_code": ["data=fineweb", "data.extract.mark_code=true"],
}


def outcome(overrides):
    from data_pipeline.audit import RemovedBy
    from data_pipeline.pipeline import documents

    stream = documents(data_cfg(overrides))
    removed = RemovedBy().watch(stream)
    kept_text = {doc.id: doc.text for doc in stream}
    return removed.step, kept_text


def quality_model_rows(workdir: str, labels: list[dict]) -> None:
    """The learned quality filter (data_pipeline/quality_training.py on the shipped labels,
    seed 0, as launch/train_quality_model.py trains it) after the heuristics of sample.yaml and
    in their place, counted on the pages it did not train or choose its threshold on (its test
    split), and on every junk page."""
    from data_pipeline.labelled_pages import GOOD, sample_pages
    from data_pipeline.quality_training import train_quality_model

    model = os.path.join(workdir, "quality.safetensors")
    pages = sample_pages()
    said = train_quality_model([p["text"] for p in pages], [p["label"] for p in pages], GOOD, model)
    h = said["held_out"]
    print(f"\nquality model alone, test split: threshold {said['threshold']:.3f}, good kept {h['recall_keep']:.1%} "
          f"of {h['good']}, precision {h['precision_keep']:.1%}, junk kept {h['junk_kept']} of {sum(h['junk'].values())} "
          f"{h['junk_kept_by_label']}")
    test_ids = {pages[i]["id"] for i in said["test_indices"]}
    good = [lab for lab in labels if lab["kind"] == "good" and lab["lang"] == "en" and lab["record_id"] in test_ids]
    junk = [lab for lab in labels if lab["kind"] in JUNK]
    qm = ["data.quality_model.enabled=true", f"data.quality_model.model_path={model}"]
    print(f"{'chain with the quality model':<40} {'good English kept (test split)':>30} {'junk kept (all)':>16}")
    for name, overrides in (("after the heuristics (sample.yaml)", qm),
                            ("in place of the heuristics", qm + ["data.quality_model.replace_heuristics=true"])):
        fate, kept = outcome(overrides)
        kept_good = sum(lab["record_id"] in kept for lab in good)
        kept_junk = [lab["kind"] for lab in junk if lab["record_id"] in kept]
        lost = collections.Counter(fate.get(lab["record_id"], "?") for lab in good if lab["record_id"] not in kept)
        print(f"{name:<40} {kept_good:>16} of {len(good):<12} {len(kept_junk):>6} of {len(junk):<3} "
              f"lost to: {dict(lost.most_common())}", flush=True)


def main() -> None:
    with open(os.path.join(REPO, "data_pipeline", "assets", "sample_labels.jsonl")) as f:
        labels = [json.loads(line) for line in f]
    good = [lab for lab in labels if lab["kind"] == "good" and lab["lang"] == "en"]
    junk = [lab for lab in labels if lab["kind"] in JUNK]
    print(f"{'configuration':<26} {'good English kept':>18} {'junk kept':>10} {'kept text with code lines':>26}  "
          "good pages dropped by (top 4)")
    for name, overrides in ({} if "--only-quality-model" in sys.argv else CONFIGS).items():
        fate, kept = outcome(overrides)
        kept_good = [lab for lab in good if lab["record_id"] in kept]
        kept_junk = [lab for lab in junk if lab["record_id"] in kept]
        with_code = sum(">>> " in kept[lab["record_id"]] for lab in kept_good)
        lost = collections.Counter(fate.get(lab["record_id"], "?") for lab in good if lab["record_id"] not in kept)
        top = ", ".join(f"{k} {v}" for k, v in lost.most_common(4))
        print(f"{name:<26} {len(kept_good):>8} of {len(good):<8} {len(kept_junk):>5} of {len(junk):<3} "
              f"{with_code:>14} pages      {top}", flush=True)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        quality_model_rows(d, labels)


if __name__ == "__main__":
    main()
