"""kiln <-> Hugging Face: logits, tokenizer ids, unsupported models, init_from=hf:, export CLI.

The point of an export is that any HF tool sees *the same model* kiln trained, so the
checks are exact equalities: fp32 logits within 1e-4, token ids identical.
"""

import json
import math
import os
import shutil

import hf_helpers
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.pipeline import document_stream
from data_pipeline.tokenizer import CHAT_TOKENS, Tokenizer
from model.hf_interop import UnsupportedModelError, load_hf_llama, model_config_from_hf
from model.llama import ModelConfig, Transformer
from train.checkpoint.full_state import load_model
from train.hf_export import export_hf, parse_size

SAMPLE_WARC = os.path.join(hf_helpers.REPO, "data_pipeline", "assets", "sample.warc.gz")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return hf_helpers.tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def spm_path(run_dir):
    return os.path.join(run_dir, "tokenizer.model")


def _randomize_norms(model):
    """Norm gains start at 1; random ones make a swapped or dropped norm visible."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)


def _kiln_step_dir(path, cfg: ModelConfig, spm_path: str) -> Transformer:
    """A minimal kiln checkpoint directory (weights, model config, tokenizer) for ``cfg``."""
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    model = Transformer(cfg)
    _randomize_norms(model)
    os.makedirs(path, exist_ok=True)
    save_model(model, os.path.join(path, "model.safetensors"))
    OmegaConf.save(OmegaConf.structured(cfg), os.path.join(path, "model_config.yaml"))
    shutil.copyfile(spm_path, os.path.join(path, "tokenizer.model"))
    return model.eval()


@pytest.mark.parametrize("tied", [True, False])
def test_kiln_to_hf_logits_match(tmp_path, spm_path, tied):
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_hidden=96, vocab_size=1024,
                      max_seq_len=96, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=tied)
    model = _kiln_step_dir(tmp_path / "ckpt", cfg, spm_path)
    # Untied: force several shards to exercise the index that transformers follows.
    summary = export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), max_shard_size="100KB" if not tied else "5GB")
    assert (summary["shards"] > 1) == (not tied)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == (not tied)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.config.num_key_value_heads == 2 and hf.config.tie_word_embeddings == tied
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == tied
    tokens = torch.randint(0, 1024, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(tokens)
        theirs = hf(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    # And back: the export imports to the very same tensors.
    cfg2, state = load_hf_llama(str(tmp_path / "hf"))
    assert cfg2 == cfg
    for name, t in model.state_dict().items():
        assert torch.equal(state[name], t), name


@pytest.mark.parametrize("tied", [True, False])
def test_hf_to_kiln_logits_match(tmp_path, tied):
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(hidden_size=64, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=3, vocab_size=300, max_position_embeddings=128, rope_theta=20000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=tied)
    hf = LlamaForCausalLM(hf_cfg).eval()
    _randomize_norms(hf)
    hf.save_pretrained(tmp_path)
    cfg, state = load_hf_llama(str(tmp_path))
    assert (cfg.n_kv_heads, cfg.ffn_hidden, cfg.rope_theta, cfg.tie_embeddings) == (2, 80, 20000.0, tied)
    model = Transformer(cfg)
    model.load_state_dict(state, strict=True)
    model.eval()
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    tokens = torch.randint(0, 300, (2, 128), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (model(tokens)[0] - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("kept", ["tok_embeddings.weight", "output.weight"])
def test_tied_checkpoint_loads_whichever_name_was_stored(tmp_path, spm_path, kept):
    """Writers that de-duplicate shared tensors may keep either name of the tied pair."""
    from safetensors.torch import save_file

    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, vocab_size=1024, max_seq_len=16, tie_embeddings=True)
    model = _kiln_step_dir(tmp_path, cfg, spm_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.pop("output.weight" if kept == "tok_embeddings.weight" else "tok_embeddings.weight")
    save_file(state, tmp_path / "model.safetensors")
    loaded, _ = load_model(str(tmp_path))
    assert torch.equal(loaded.tok_embeddings.weight, model.tok_embeddings.weight)
    assert loaded.output.weight is loaded.tok_embeddings.weight


BASE = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 100, "max_position_embeddings": 64}


@pytest.mark.parametrize("change, field", [
    ({"model_type": "gpt_neox"}, "model_type"),
    ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.rope_type"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters.rope_type"),
    ({"head_dim": 32}, "head_dim"),
])
def test_unsupported_config_names_the_field(change, field):
    with pytest.raises(UnsupportedModelError) as e:
        model_config_from_hf({**BASE, **change})
    assert e.value.field == field and field in str(e.value)


def test_supported_variants_are_accepted():
    """The refusals above are specific: plain Mistral and explicit default rope still load."""
    cfg = model_config_from_hf({**BASE, "model_type": "mistral", "sliding_window": None,
                                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert (cfg.d_model, cfg.n_kv_heads, cfg.rope_theta, cfg.max_seq_len) == (64, 2, 1e6, 64)


def test_unexpected_tensor_is_refused(tmp_path):
    """A bias in the weights (a config that lies) must fail loudly, not be dropped."""
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in BASE.items() if k != "model_type"}))
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="q_proj.bias"):
        load_hf_llama(str(tmp_path))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(ValueError):
        parse_size("five gigs")


TEXTS = [
    "Hello world", " leading space", "two  spaces and   three", "trailing   ", "   ", "\t\ttabs\tinside",
    "line one\nline two\n\n\nthree blank lines\r\nCRLF", "x = 12345 + 0.5e-3; 2024-01-31 99%", "1000000000",
    "naïve café — “quotes” ‘single’ … ½ ©", "日本語のテキスト、中文文本。", "😀🚀 emoji 👩‍💻", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ ᚠᚢᚦ",
    "Ωμέγα Привет مرحبا שלום", "<|user|>What is 2+2?<|end_of_turn|><|assistant|> 4<|end_of_turn|>",
    " <|system|> You are kind.\n<|user|>hi", "literal </s> and <s> and <unk> and <pad> stay text",
    "a\u00a0b\u2003c\u200bd", "", "def f(x):\n    return x ** 2  # comment\n",
]


def test_exported_tokenizer_gives_kiln_ids(tmp_path_factory, spm_path):
    kiln = Tokenizer(spm_path)
    hf = AutoTokenizer.from_pretrained(hf_helpers.tiny_export(tmp_path_factory))
    cfg = DataConfig(sources=[SourceConfig(paths=[SAMPLE_WARC])])
    docs = [d.text for _, d in zip(range(40), document_stream(cfg, split=None, loop=False))]
    byte_ids = set(range(kiln.sp.piece_to_id("<0x00>"), kiln.sp.piece_to_id("<0xFF>") + 1))
    seen_bytes = seen_digits = 0
    for text in TEXTS + docs:
        ids = kiln.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text[:80]
        assert hf(text)["input_ids"] == ids  # kiln adds no BOS, neither may the export
        assert hf.decode(ids) == kiln.decode(ids) == text, text[:80]
        seen_bytes += len(byte_ids.intersection(ids))
        seen_digits += sum(kiln.sp.id_to_piece(i).isdigit() for i in ids)
    assert seen_bytes > 20 and seen_digits > 20  # byte fallback and split digits were exercised
    assert [hf.convert_tokens_to_ids(t) for t in CHAT_TOKENS] == [kiln.control[t] for t in CHAT_TOKENS]
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 3, 0)
    # Batch encoding pads on the left with kiln's pad id, for generation with HF tools.
    batch = hf(["a b c d", "a"], padding=True)
    assert batch["input_ids"][1][:-1] == [3] * (len(batch["input_ids"][0]) - 1)


def test_init_from_hf_starts_training_from_the_imported_weights(tmp_path, spm_path):
    from hydra import compose, initialize_config_dir

    from train.config import ConfigError, register_configs, validate
    from train.trainer import Trainer

    vocab = Tokenizer(spm_path).vocab_size
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, vocab_size=vocab,
                                      max_position_embeddings=64, rope_theta=30000.0, tie_word_embeddings=True))
    _randomize_norms(hf)
    hf.eval().save_pretrained(tmp_path / "hf")
    shutil.copyfile(spm_path, tmp_path / "hf" / "tokenizer.model")
    register_configs()
    overrides = [f"init_from=hf:{tmp_path / 'hf'}", f"run_dir={tmp_path / 'run'}", "data.seq_len=32",
                 "train.micro_batch_size=2", "train.eval_sequences=2", "train.max_steps=1", "train.eval_every=0",
                 "train.log_every=1", "train.sample_tokens=0", "logger.plot=false", "checkpoint.every=1000",
                 "model.max_seq_len=16", "model.d_model=48"]  # model.* is the HF config's, not these
    with initialize_config_dir(config_dir=os.path.join(hf_helpers.REPO, "conf"), version_base=None):
        cfg = compose("pretrain", overrides=overrides)
    validate(cfg)  # data.seq_len=32 > model.max_seq_len=16 is fine: the HF model allows 64
    trainer = Trainer(cfg)
    mc = trainer.model_cfg
    assert (mc.d_model, mc.n_kv_heads, mc.ffn_hidden, mc.vocab_size, mc.rope_theta, mc.max_seq_len) == (
        64, 2, 96, vocab, 30000.0, 64)
    assert trainer.tokenizer.path == str(tmp_path / "hf" / "tokenizer.model")
    # The batch step 1 will train on: read it from the trainer's own stream, then rewind.
    state = trainer.train_batches.state_dict()
    batch = next(trainer.train_batches)
    trainer.train_batches.load_state_dict(state)
    with torch.no_grad():
        logits = hf(batch["input"]).logits
    hf_loss = F.cross_entropy(logits.flatten(0, 1), batch["target"].flatten()).item()
    result = trainer.fit()
    assert math.isclose(result["losses"][1], hf_loss, abs_tol=1e-4)
    assert abs(hf_loss - math.log(vocab)) > 1e-3  # the weights are HF's, not a fresh uniform-ish init
    trainer.backend.shutdown()

    os.remove(tmp_path / "hf" / "tokenizer.model")
    with pytest.raises(ConfigError, match="SentencePiece"):
        Trainer(cfg)


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end_of_turn|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_export_cli_on_a_real_checkpoint(tmp_path, run_dir, spm_path):
    from tests.ckpt_helpers import reseal
    from train.checkpoint import find_latest

    step = tmp_path / "step"
    shutil.copytree(find_latest(os.path.join(run_dir, "checkpoints")), step)
    (step / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    reseal(step)  # a file added to a checkpoint is part of it only once its manifest lists it
    out = tmp_path / "hf"
    p = hf_helpers.launch("export_hf.py", str(step), str(out))
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["chat_template"] and summary["shards"] == 1
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer.model",
              "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        assert (out / f).is_file(), f
    config = json.loads((out / "config.json").read_text())
    assert (config["num_key_value_heads"], config["tie_word_embeddings"], config["eos_token_id"]) == (2, True, 2)
    kiln = Tokenizer(spm_path)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [kiln.eos_id, kiln.control["<|end_of_turn|>"]]

    tok = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>Hi there<|end_of_turn|><|assistant|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == kiln.encode(text) and ids[0] == kiln.control["<|user|>"]

    model, _ = load_model(str(step))
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.tensor([kiln.encode("The Python interpreter reads 42 lines.\nNext line: déjà vu.")])
    with torch.no_grad():
        assert (model(tokens)[0] - hf(tokens).logits).abs().max().item() <= 1e-4


def test_export_refuses_a_directory_without_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete kiln checkpoint"):
        export_hf(str(tmp_path), str(tmp_path / "out"))
